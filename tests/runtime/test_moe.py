"""runtime.moe on the tiny models: masking equals dropping, top-k and group checks."""
from __future__ import annotations

import copy

import pytest
import torch

from optimizer.errors import InputError
from runtime import moe
from runtime.tiny_models import FAMILIES, make_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from transformers import AutoModelForCausalLM

    out = {}
    for family in FAMILIES:
        d = make_tiny_model(family, tmp_path_factory.mktemp(family))
        out[family] = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    return out


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_mask_equals_drop(models: dict, family: str) -> None:
    model = models[family]
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = model(x).logits
    layers = moe.moe_layers(model)
    masked = {h.index: ([0, 5] if h.num_groups > 1 else [1, 3, 6]) for h in layers}
    with moe.mask_experts(model, masked):
        a = model(x).logits
    assert torch.equal(model(x).logits, ref)  # restored
    dropped = copy.deepcopy(model)
    for h in layers:
        moe.drop_experts(dropped, h.index, [e for e in range(h.num_experts) if e not in masked[h.index]])
    assert torch.allclose(a, dropped(x).logits, atol=1e-5)
    assert not torch.allclose(a, ref, atol=1e-4)
    assert [h.num_experts for h in moe.moe_layers(dropped)] == [h.num_experts - len(masked[h.index]) for h in layers]


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_masking_no_expert_is_the_model_itself(models: dict, family: str) -> None:
    """The masked forward is the family's own routing (DeepSeek-V2: no renormalisation, scaled weights, groups by
    their best score), so masking nothing, or setting the original k, changes no logit by a single bit."""
    model = models[family]
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    ref = model(x).logits
    with moe.mask_experts(model, {h.index: [] for h in moe.moe_layers(model)}):
        assert torch.equal(model(x).logits, ref)
    for h in moe.moe_layers(model):  # the original k, set explicitly
        moe.set_top_k(model, h.index, h.top_k)
    assert torch.equal(model(x).logits, ref)


@torch.no_grad()
def test_set_top_k_and_routing_never_reaches_masked(models: dict) -> None:
    model = copy.deepcopy(models["qwen3_moe"])
    layer = moe.moe_layers(model)[0].index
    moe.set_top_k(model, layer, 1)
    assert moe.top_k(model, layer) == 1
    seen = []
    h = moe.get_layer(model, layer)
    hook = h.experts.register_forward_hook(lambda m, args, out: seen.append(args[1].clone()))
    with moe.mask_experts(model, {layer: [0, 1, 2, 3]}):
        model(torch.randint(0, 256, (4, 32)))
    hook.remove()
    assert seen[0].shape[-1] == 1 and int(seen[0].min()) >= 4
    with pytest.raises(InputError):
        moe.set_top_k(model, layer, 9)


def test_group_checks(models: dict) -> None:
    model = copy.deepcopy(models["deepseek_v3"])
    layer = moe.moe_layers(model)[0].index
    with pytest.raises(InputError, match="same number of kept experts"):
        moe.drop_experts(model, layer, [0, 1, 2, 4, 5])
    with pytest.raises(InputError, match="at least 2"):
        moe.drop_experts(model, layer, [0, 4])
    moe.drop_experts(model, layer, [0, 2, 5, 7])
    h = moe.get_layer(model, layer)
    assert h.num_experts == 4 and h.router.e_score_correction_bias.shape == (4,)
    assert h.experts.gate_up_proj.shape[0] == 4
    with pytest.raises(InputError, match="top_k"):
        moe.set_top_k(model, layer, 3)  # topk_group=1 of 2 groups of 2: at most 2 reachable
