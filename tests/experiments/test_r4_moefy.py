"""R4 pieces on tiny random tensors / a tiny Llama (fast); the SmolLM2 build itself is not run here."""
from __future__ import annotations

import math

import pytest
import torch

from experiments.reference_models.r3.convert import layer_state, set_top_k
from experiments.reference_models.r3.split import expert_weights, random_split
from experiments.reference_models.r4.build import R4Settings, moefy_distilled, rescale_experts
from experiments.reference_models.r4.distill import DistillSettings, MoEBlock, balance_loss, distill, relative_error
from experiments.reference_models.r4.stats import RouterLogitRecorder, routing_stats, summarize
from tests.experiments.test_r3_moefy import _tiny_llama

torch.set_num_threads(1)


def _ffn(seed: int = 0, hidden: int = 16, inter: int = 48):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(inter, hidden, generator=gen) / 4, torch.randn(inter, hidden, generator=gen) / 4,
            torch.randn(hidden, inter, generator=gen) / 4)


def _block(top_k: int = 2, seed: int = 0) -> tuple[MoEBlock, tuple[torch.Tensor, ...]]:
    gate, up, down = _ffn(seed)
    split = random_split(48, 4, 8, seed=seed)
    experts = expert_weights(gate, up, down, split, routed_scale=float(top_k), shared_scale=2.0)
    router = torch.randn(4, 16, generator=torch.Generator().manual_seed(seed + 1))
    return MoEBlock(experts, router, top_k), (gate, up, down)


def test_block_matches_transformers_qwen2_moe_block() -> None:
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    block, _ = _block()
    with torch.no_grad():
        block.shared_expert_gate.normal_()
    cfg = Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=10, shared_expert_intermediate_size=8, num_experts=4,
                         num_experts_per_tok=2, norm_topk_prob=True, hidden_act="silu")
    hf = Qwen2MoeSparseMoeBlock(cfg).eval()
    experts, router, shared_gate = block.tensors()
    state = {k.removeprefix("mlp."): v for k, v in layer_state("mlp", experts, router).items()}
    state["shared_expert_gate.weight"] = shared_gate
    hf.load_state_dict(state)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(block(x.view(-1, 16))[0], hf(x).view(-1, 16), rtol=1e-5, atol=1e-5)


def test_routing_weights_renormalised_over_top_k() -> None:
    block, _ = _block(top_k=2)
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, weights, top_i = block.routing(x)
    assert torch.allclose(weights.sum(-1), torch.ones(7))
    assert ((weights > 0).sum(-1) == 2).all()
    assert torch.equal(top_i, logits.topk(2, dim=-1).indices)


def test_distillation_reduces_error_on_synthetic_layer() -> None:
    block, (gate, up, down) = _block(top_k=2)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(512, 16, generator=gen)
    y = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    before = relative_error(block, x, y)
    log = distill(block, x, y, DistillSettings(top_k=2, steps=60, batch_tokens=128, lr_router=1e-2,
                                               lr_experts=1e-2, balance_alpha=0.01))
    after = relative_error(block, x, y)
    assert after < 0.7 * before, (before, after)
    assert log["steps"] == 60 and math.isfinite(log["last_batch_rel_error"])
    block2, _ = _block(top_k=2)  # deterministic given the seed
    distill(block2, x, y, DistillSettings(top_k=2, steps=60, batch_tokens=128, lr_router=1e-2, lr_experts=1e-2))
    torch.testing.assert_close(block2.router, block.router)


def test_router_only_keeps_experts() -> None:
    block, (gate, up, down) = _block(top_k=2)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(6))
    y = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    w0, r0 = block.down.detach().clone(), block.router.detach().clone()
    distill(block, x, y, DistillSettings(top_k=2, steps=5, batch_tokens=64, train_experts=False))
    assert torch.equal(block.down, w0) and not torch.equal(block.router, r0)
    assert all(p.requires_grad for p in block.parameters())


def test_rescale_experts_uses_mean_chosen_weight() -> None:
    block, _ = _block(top_k=2)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(7))
    down0 = block.down.detach().clone()
    with torch.no_grad():
        _, weights, _ = block.routing(x)
    mean_w = weights.sum(0) / (weights > 0).sum(0).clamp_min(1)
    factor = rescale_experts(block, x)
    expect = torch.where(mean_w > 0, 1 / (2 * mean_w), torch.ones_like(mean_w))
    torch.testing.assert_close(factor, expect)
    torch.testing.assert_close(block.down, down0 * expect[:, None, None])


def test_balance_loss_is_one_when_balanced() -> None:
    logits = torch.zeros(4, 4)
    top_i = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])
    assert float(balance_loss(logits, top_i)) == pytest.approx(1.0)
    assert float(balance_loss(logits, torch.zeros(4, 2, dtype=torch.long))) == pytest.approx(1.0)  # uniform P
    sharp = torch.tensor([[9.0, 0, 0, 0]] * 4)
    assert float(balance_loss(sharp, torch.tensor([[0, 1]] * 4))) > 1.5


def test_routing_stats_hand_computed() -> None:
    p1, p2 = [0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.3, 0.4]
    logits = torch.tensor([p1, p2]).log()
    st = routing_stats(logits, k=2)
    h1 = 1.75 * math.log(2)
    h2 = -sum(p * math.log(p) for p in p2)
    assert st["entropy"] == pytest.approx((h1 + h2) / 2)
    assert st["entropy_over_log_e"] == pytest.approx((h1 + h2) / 2 / math.log(4))
    assert st["topk_mass"] == pytest.approx((0.75 + 0.7) / 2)
    assert st["top1_weight"] == pytest.approx((0.5 / 0.75 + 0.4 / 0.7) / 2)
    # token 1 -> experts {0, 1}, token 2 -> {3, 2}: every expert gets 1 of 2 tokens; mean load k/E = 0.5
    assert st["load"] == [0.5, 0.5, 0.5, 0.5]
    assert st["max_over_mean_load"] == pytest.approx(1.0) and st["unused_experts"] == 0
    st = routing_stats(torch.tensor([p1, p1, p1]).log(), k=2)  # all tokens -> {0, 1}
    assert st["load"] == [1.0, 1.0, 0.0, 0.0]
    assert st["max_over_mean_load"] == pytest.approx(2.0) and st["unused_experts"] == 2
    uniform = routing_stats(torch.zeros(3, 8), k=2)
    assert uniform["entropy_over_log_e"] == pytest.approx(1.0) and uniform["topk_mass"] == pytest.approx(0.25)
    summ = summarize([st, uniform])
    assert summ["layers"] == 2 and summ["max_over_mean_load_max"] == pytest.approx(max(2.0, uniform[
        "max_over_mean_load"]))


def test_moefy_distilled_tiny_model_end_to_end() -> None:
    dense = _tiny_llama()
    windows = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(1))
    s = R4Settings(experts=8, shared_neurons=16, top_k=2, report_ks=[1, 2, 8], init_logit_std=1.0,
                   distill=DistillSettings(steps=30, batch_tokens=64, lr_router=1e-2, lr_experts=3e-3))
    moe, info, splits = moefy_distilled(dense, windows, s, log=lambda m: None)
    assert type(moe).__name__ == "Qwen2MoeForCausalLM"
    assert moe.config.norm_topk_prob is True and moe.config.num_experts == 8 and moe.config.num_experts_per_tok == 2
    assert moe.config.moe_intermediate_size == 8 and len(splits) == 2
    for st in info["layers"]:
        assert set(st["rel_error"]) == {"1", "2", "8"} and st["rel_error_on"] == "holdout"
        assert 0 < st["routing"]["entropy_over_log_e"] < 1
    probe = windows[:2, :16]
    with RouterLogitRecorder(moe) as rec, torch.no_grad():
        logits = moe(input_ids=probe).logits
    assert torch.isfinite(logits).all()
    layer_stats = rec.stats(2)
    assert len(layer_stats) == 2 and all(st["tokens"] == 32 for st in layer_stats)
    assert all(sum(st["load"]) == pytest.approx(2.0) for st in layer_stats)
    set_top_k(moe, 8)
    with torch.no_grad():
        assert torch.isfinite(moe(input_ids=probe).logits).all()
