"""runtime.moe surgery refuses what it cannot do; DeepSeek routing with routed_scaling_factor != 1.

Tiny models (runtime.tiny_models): 8 experts, top-2; DeepSeek-V3 has 2 groups of 4 with topk_group=1, so at most
1 * (8 // 2) = 4 experts are reachable per token.
"""
from __future__ import annotations

import copy

import pytest
import torch

from optimizer.errors import InputError
from runtime import moe
from runtime.moe import check_keep
from runtime.tiny_models import tiny_config

SCALE = 2.5
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small forwards on shared CPUs


def _model(family: str, **overrides):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    for k, v in overrides.items():
        setattr(config, k, v)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 0.5)
            for h in moe.moe_layers(model):
                if hasattr(h.router, "e_score_correction_bias"):  # non-zero, so leaving it out shows
                    h.router.e_score_correction_bias.normal_(0.0, 0.1)
    return model


@pytest.fixture(scope="module")
def models() -> dict:
    return {"qwen3_moe": _model("qwen3_moe"), "mixtral": _model("mixtral"),
            "deepseek_v3": _model("deepseek_v3", routed_scaling_factor=SCALE)}


def test_check_keep_refusals() -> None:
    with pytest.raises(InputError, match="must keep at least one expert"):
        check_keep(8, [])
    for bad in ([1, 1, 2], [0, 8], [-1, 3]):
        with pytest.raises(InputError, match=r"kept experts must be distinct indices in 0..7"):
            check_keep(8, bad)
    assert check_keep(8, [7, 0, 3]) == [0, 3, 7]  # boundaries accepted, sorted
    assert check_keep(8, [0, 1], k=2) == [0, 1]
    with pytest.raises(InputError, match="top_k=3 exceeds the 2 experts the router can reach with 2 kept"):
        check_keep(8, [0, 1], k=3)
    # two groups of 4: the same number kept in each, at least 2
    with pytest.raises(InputError, match=r"same number of kept experts in each of the 2 groups, got \[3, 2\]"):
        check_keep(8, [0, 1, 2, 4, 5], groups=2)
    with pytest.raises(InputError, match="at least 2 kept experts per group, got 1"):
        check_keep(8, [0, 4], groups=2)
    assert check_keep(8, [5, 4, 1, 0], groups=2, topk_groups=1, k=2) == [0, 1, 4, 5]
    # topk_groups=1 reaches one group of 2: k=3 cannot be served; topk_groups=2 reaches 2 * 2 = 4
    with pytest.raises(InputError, match="top_k=3 exceeds the 2 experts"):
        check_keep(8, [0, 1, 4, 5], groups=2, topk_groups=1, k=3)
    assert check_keep(8, [0, 1, 4, 5], groups=2, topk_groups=2, k=4) == [0, 1, 4, 5]
    with pytest.raises(InputError, match="top_k=5 exceeds the 4 experts"):
        check_keep(8, [0, 1, 4, 5], groups=2, topk_groups=2, k=5)


def test_set_top_k_refusals(models: dict) -> None:
    model = copy.deepcopy(models["qwen3_moe"])
    layer = moe.moe_layers(model)[0].index
    for bad in (0, -1, 9, True, 2.0, "2"):
        with pytest.raises(InputError, match=r"top_k must be an integer in 1..8 \(8 experts\)"):
            moe.set_top_k(model, layer, bad)
        assert moe.top_k(model, layer) == 2  # unchanged
    moe.set_top_k(model, layer, 8)
    assert moe.top_k(model, layer) == 8
    moe.set_top_k(model, layer, 1)
    assert moe.top_k(model, layer) == 1
    with pytest.raises(InputError, match="is not an MoE layer"):
        moe.set_top_k(model, 0, 1)  # layer 0 is dense


def test_set_top_k_group_limit(models: dict) -> None:
    model = copy.deepcopy(models["deepseek_v3"])
    layer = moe.moe_layers(model)[0].index
    with pytest.raises(InputError, match=r"top_k must be an integer in 1..4 \(8 experts\), got 5"):
        moe.set_top_k(model, layer, 5)
    moe.set_top_k(model, layer, 4)
    assert moe.top_k(model, layer) == 4
    x = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    seen = []
    h = moe.get_layer(model, layer)
    hook = h.experts.register_forward_hook(lambda m, a, o: seen.append(a[1].clone()))
    with torch.no_grad():
        model(x)
    hook.remove()
    assert seen[0].shape[-1] == 4
    # every token's 4 experts come from one group (topk_group=1)
    assert all(len({int(e) // 4 for e in row}) == 1 for row in seen[0])


def test_set_top_k_updates_mixtrals_block_copy(models: dict) -> None:
    model = copy.deepcopy(models["mixtral"])
    h = moe.moe_layers(model)[0]
    moe.set_top_k(model, h.index, 3)
    assert h.router.top_k == 3 and h.block.top_k == 3


def test_drop_refusals_leave_the_layer_untouched(models: dict) -> None:
    model = copy.deepcopy(models["deepseek_v3"])
    layer = moe.moe_layers(model)[0].index
    for keep, message in (([0, 1, 2, 2, 4, 5], "distinct"), ([0, 1, 4, 8], "distinct"), ([0, 1, 2, 4, 5], "same"),
                          ([0, 4], "at least 2")):
        with pytest.raises(InputError, match=message):
            moe.drop_experts(model, layer, keep)
    h = moe.get_layer(model, layer)
    assert h.num_experts == 8 and h.experts.gate_up_proj.shape[0] == 8
    moe.set_top_k(model, layer, 3)  # 4 reachable with all experts, but only 2 after keeping 2 per group
    with pytest.raises(InputError, match="top_k=3 exceeds the 2 experts"):
        moe.drop_experts(model, layer, [0, 1, 4, 5])
    assert moe.get_layer(model, layer).num_experts == 8


def test_invalid_masks_are_refused_and_nothing_stays_patched(models: dict) -> None:
    model = models["qwen3_moe"]
    first, second = (h.index for h in moe.moe_layers(model))
    for bad in ([8], [-1], [0, 9]):
        with pytest.raises(InputError, match=r"cannot mask experts \[(8|-1|9)\]; the layer has 8"):
            with moe.mask_experts(model, {first: bad}):
                pass
    # masking 7 of 8 leaves 1 expert for top-2; masking 6 leaves exactly 2
    with pytest.raises(InputError, match="masking 7 experts leaves 1 routable, fewer than top_k=2"):
        with moe.mask_experts(model, {first: list(range(7))}):
            pass
    with moe.mask_experts(model, {first: list(range(6))}):
        pass
    # the first layer is patched before the second fails: it must be restored
    with pytest.raises(InputError):
        with moe.mask_experts(model, {first: [0], second: [8]}):
            pass
    assert all("forward" not in h.router.__dict__ for h in moe.moe_layers(model))


def test_grouped_masks_count_only_reachable_groups(models: dict) -> None:
    model = models["deepseek_v3"]
    layer = moe.moe_layers(model)[0].index
    # groups {0..3}, {4..7}, topk_group=1: masking 0,1,2 and 4,5,6 leaves one expert in each group, and a
    # token reaches only one group: 1 routable < top_k=2 (although 2 experts are left in total)
    with pytest.raises(InputError, match="leaves 1 routable, fewer than top_k=2"):
        with moe.mask_experts(model, {layer: [0, 1, 2, 4, 5, 6]}):
            pass
    with moe.mask_experts(model, {layer: [0, 1, 2, 3]}):  # a whole group masked: the other has 4
        pass
    # groups with 1 and 2 left: a token whose best group is the one with 1 left could only fill top-2 with a
    # masked expert, so the mask is refused (it was accepted before: only the best-stocked groups were counted)
    with pytest.raises(InputError, match="leaves 1 routable, fewer than top_k=2"):
        with moe.mask_experts(model, {layer: [0, 1, 2, 4, 5]}):
            pass


@torch.no_grad()
def test_routed_scaling_factor_is_kept_by_masking(models: dict) -> None:
    """routed_scaling_factor = 2.5 (norm_topk_prob): a token's routing weights sum to 2.5, with or without a mask;
    masking nothing is the model itself, bit for bit; masking equals dropping and changes the output."""
    model = models["deepseek_v3"]
    layers = moe.moe_layers(model)
    assert all(h.router.routed_scaling_factor == SCALE for h in layers)
    x = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    weights: list[torch.Tensor] = []
    indices: list[torch.Tensor] = []

    def record(module, args, output) -> None:
        indices.append(args[1])
        weights.append(args[2])

    hooks = [h.experts.register_forward_hook(record) for h in layers]
    ref = model(x).logits
    assert torch.allclose(torch.cat(weights).sum(-1), torch.full((40,), SCALE), atol=1e-5)
    ref_w = torch.cat(weights)
    weights.clear()
    indices.clear()
    with moe.mask_experts(model, {h.index: [] for h in layers}):
        assert torch.equal(model(x).logits, ref)
    assert torch.equal(torch.cat(weights), ref_w)
    weights.clear()
    indices.clear()
    masked = {h.index: [0, 5] for h in layers}
    with moe.mask_experts(model, masked):
        out = model(x).logits
    for hk in hooks:
        hk.remove()
    assert torch.allclose(torch.cat(weights).sum(-1), torch.full((40,), SCALE), atol=1e-5)
    assert not any(bool(torch.isin(i, torch.tensor([0, 5])).any()) for i in indices)
    assert not torch.allclose(out, ref, atol=1e-4)
    dropped = copy.deepcopy(model)
    for h in layers:
        moe.drop_experts(dropped, h.index, [1, 2, 3, 4, 6, 7])
    assert torch.allclose(out, dropped(x).logits, atol=1e-5)


@torch.no_grad()
def test_nested_masks_restore_the_outer_mask(models: dict) -> None:
    model = models["qwen3_moe"]
    layer = moe.moe_layers(model)[0].index
    x = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4))
    ref = model(x).logits
    with moe.mask_experts(model, {layer: [0, 1, 2]}):
        outer = model(x).logits
        with moe.mask_experts(model, {layer: []}):  # the innermost mask wins
            assert torch.equal(model(x).logits, ref)
        assert torch.equal(model(x).logits, outer)
    assert not torch.equal(outer, ref)
    assert torch.equal(model(x).logits, ref)


@torch.no_grad()
def test_grouped_mask_never_routes_outside_the_unmasked_experts_of_the_picked_group(models: dict) -> None:
    """Masking 0, 1, 2 and 6 leaves group 0 = {3} and group 1 = {4, 5, 7}; the check accepts it (group 1 can serve
    top-2). A token whose best group is group 0 (expert 3's score bias raised) has one finite choice for two slots:
    the second is an arbitrary -inf entry (expert 6, masked, on CPU) and gets its real routing weight. Either the
    mask must be refused or every token must route to unmasked experts of one group."""
    model = copy.deepcopy(models["deepseek_v3"])
    h = moe.moe_layers(model)[0]
    h.router.e_score_correction_bias[3] = 5.0
    masked = [0, 1, 2, 6]
    seen = []
    hook = h.experts.register_forward_hook(lambda m, a, o: seen.append(a[1].clone()) or None)
    try:
        with moe.mask_experts(model, {h.index: masked}):
            model(torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0)))
    except InputError:
        return  # refusing such a mask is a fix too
    finally:
        hook.remove()
    idx = seen[0]
    assert not bool(torch.isin(idx, torch.tensor(masked)).any()), idx.tolist()
    assert all(len({int(e) // 4 for e in row}) == 1 for row in idx), idx.tolist()
