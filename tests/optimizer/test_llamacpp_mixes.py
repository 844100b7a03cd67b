"""llama.cpp's standard mixes (issue 12, item 5): per-block types derived by hand from llama-quant.cpp's rules,
the DeepSeek-V3 Q4_K_M size against the published file, and the ``llamacpp_mix`` baseline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from optimizer.architectures import load_architecture
from optimizer.baselines import BaselineOptions, run_baseline
from optimizer.budget import Budget
from optimizer.byte_model import plan_bytes_by_kind, uniform_bytes
from optimizer.cli import main
from optimizer.errors import InfeasibleError, InputError
from optimizer.formulation.instance import FormulationOptions, build_instance
from optimizer.llamacpp_mixes import MIXES, mix_bytes, mix_types, use_more_bits
from optimizer.model_spec import BlockKind
from optimizer.plan import Target
from optimizer.profile import save_profile
from optimizer.solve import SolveOptions, optimize
from optimizer.synthetic import synthetic_architecture, synthetic_profile

DATA = Path(__file__).resolve().parents[2] / "optimizer" / "data" / "deepseek_v3"
# 16 layers (layer 0 dense, 1..15 MoE with 4 routed experts + 1 shared), every row 256 or 512 long: no fallback
SMALL = dict(num_layers=16, num_experts=4, top_k=2, hidden=256, expert_inter=256, dense_inter=512, vocab=512)


def _by_layer(types: dict[str, str], suffix: str, fmt: str) -> set[int]:
    """Layers whose blocks ending in ``suffix`` are in ``fmt`` (all such blocks of the layer, checked below)."""
    return {int(n.split(".")[2]) for n, t in types.items() if n.endswith(suffix) and t == fmt}


@pytest.fixture(scope="module")
def small():
    return synthetic_architecture(**SMALL)


@pytest.fixture(scope="module")
def deepseek_v3():
    return load_architecture(DATA / "config_671B.json")


def test_use_more_bits_by_hand() -> None:
    # n = 16: n/8 = 2, 7n/8 = 14 -> layers 0, 1, 14, 15, plus (i - 2) % 3 == 2 -> 4, 7, 10, 13
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    # n = 61 (DeepSeek-V3): 61/8 = 7, 7*61/8 = 53 -> 0..6, 53..60, and 9, 12, ..., 51
    assert [i for i in range(61) if use_more_bits(i, 61)] == [*range(7), *range(9, 52, 3), *range(53, 61)]


def test_q4_k_m_on_a_small_model(small) -> None:
    t = mix_types(small, "Q4_K_M")
    more = {0, 1, 4, 7, 10, 13, 14, 15}  # use_more_bits(i, 16), see above
    # ffn_down (dense, every routed expert and the shared expert) and attn_v get Q6_K in those layers, Q4_K else
    for suffix in ("down_proj.weight", "v_proj.weight"):
        assert _by_layer(t, suffix, "Q6_K") == more, suffix
        assert _by_layer(t, suffix, "Q4_K") == set(range(16)) - more, suffix
    assert t["model.layers.0.mlp.down_proj.weight"] == "Q6_K"  # layer 0 is dense
    assert _by_layer(t, "experts.3.down_proj.weight", "Q6_K") == more - {0}
    assert _by_layer(t, "shared_experts.down_proj.weight", "Q6_K") == more - {0}
    # gate/up, q/k/o stay in the default type; output Q6_K; token_embd the default
    for suffix in ("gate_proj.weight", "up_proj.weight", "q_proj.weight", "k_proj.weight", "o_proj.weight"):
        assert {v for n, v in t.items() if n.endswith(suffix)} == {"Q4_K"}, suffix
    assert t["lm_head.weight"] == "Q6_K" and t["model.embed_tokens.weight"] == "Q4_K"
    assert set(t) == {b.name for b in small.blocks if b.quantizable}


def test_q3_k_m_q2_k_on_a_small_model(small) -> None:
    t = mix_types(small, "Q3_K_M")
    # ffn_down: Q5_K below n/16 = 1 (layer 0), Q4_K after; attn_v: Q5_K for the first two, Q4_K after
    assert _by_layer(t, "down_proj.weight", "Q5_K") == {0}
    assert _by_layer(t, "down_proj.weight", "Q4_K") == set(range(1, 16))
    assert _by_layer(t, "v_proj.weight", "Q5_K") == {0, 1}
    assert {v for n, v in t.items() if n.endswith("o_proj.weight")} == {"Q4_K"}
    assert {v for n, v in t.items() if n.endswith("up_proj.weight")} == {"Q3_K"}
    t = mix_types(small, "Q2_K")
    # n_gqa = 1 < 4: attn_v Q3_K; ffn_down and attn_output Q3_K; the rest Q2_K
    for suffix, fmt in (("v_proj.weight", "Q3_K"), ("down_proj.weight", "Q3_K"), ("o_proj.weight", "Q3_K"),
                        ("q_proj.weight", "Q2_K"), ("gate_proj.weight", "Q2_K")):
        assert {v for n, v in t.items() if n.endswith(suffix)} == {fmt}, suffix
    assert t["lm_head.weight"] == "Q6_K" and t["model.embed_tokens.weight"] == "Q2_K"


@pytest.mark.parametrize("mix,attn_output", [("IQ1_S", "IQ2_XXS"), ("IQ1_M", "IQ2_XXS"), ("IQ2_XXS", "IQ2_XXS")])
def test_iq_mixes_count_ffn_down_tensors_in_file_order(small, mix: str, attn_output: str) -> None:
    t = mix_types(small, mix)
    # the first n/8 = 2 ffn_down *tensors* in file order take Q2_K: blk.0.ffn_down (dense) and blk.1.ffn_down_exps
    # (which sorts before blk.1.ffn_down_shexp); the shared expert of layer 1 keeps the default
    assert _by_layer(t, "mlp.down_proj.weight", "Q2_K") == {0}
    assert _by_layer(t, "experts.0.down_proj.weight", "Q2_K") == {1}
    assert _by_layer(t, "shared_experts.down_proj.weight", "Q2_K") == set()
    assert t["model.layers.1.mlp.shared_experts.down_proj.weight"] == mix
    # 4 experts (>= 4): attn_v Q4_K; attn_output IQ2_XXS for IQ1_S / IQ1_M; token_embd Q2_K; output Q5_K
    assert {v for n, v in t.items() if n.endswith("v_proj.weight")} == {"Q4_K"}
    assert {v for n, v in t.items() if n.endswith("o_proj.weight")} == {attn_output}
    assert t["model.embed_tokens.weight"] == "Q2_K" and t["lm_head.weight"] == "Q5_K"
    assert t["model.layers.5.mlp.experts.2.gate_proj.weight"] == mix


def test_fallback_tied_embeddings_and_eight_experts() -> None:
    # expert down_proj rows of 64: Q6_K -> Q8_0 and Q4_K -> Q5_0 (tensor_type_fallback)
    odd = synthetic_architecture(**{**SMALL, "expert_inter": 64})
    t = mix_types(odd, "Q4_K_M")
    assert t["model.layers.1.mlp.experts.0.down_proj.weight"] == "Q8_0"  # layer 1: use_more_bits
    assert t["model.layers.2.mlp.experts.0.down_proj.weight"] == "Q5_0"
    assert mix_types(odd, "IQ1_S")["model.layers.2.mlp.experts.0.down_proj.weight"] == "IQ4_NL"
    # tied embeddings: token_embd takes the output rules
    small = synthetic_architecture(**SMALL)
    tied = dataclasses.replace(small, blocks=tuple(b for b in small.blocks if b.kind != BlockKind.LM_HEAD))
    assert mix_types(tied, "Q4_K_M")["model.embed_tokens.weight"] == "Q6_K"
    assert mix_types(tied, "IQ1_S")["model.embed_tokens.weight"] == "Q5_K"
    # n_expert == 8 (Mixtral): attn_v and attn_k Q8_0, attn_output Q5_K
    eight = mix_types(synthetic_architecture(**{**SMALL, "num_experts": 8}), "Q4_K_M")
    assert eight["model.layers.3.self_attn.v_proj.weight"] == "Q8_0"
    assert eight["model.layers.3.self_attn.k_proj.weight"] == "Q8_0"
    assert eight["model.layers.3.self_attn.o_proj.weight"] == "Q5_K"


def test_unknown_mix_is_refused(small) -> None:
    with pytest.raises(InputError, match="unknown llama.cpp mix 'Q5_K_M'"):
        mix_types(small, "Q5_K_M")


def test_deepseek_v3_q4_k_m_matches_the_published_file(deepseek_v3) -> None:
    t = mix_types(deepseek_v3, "Q4_K_M")
    more = {i for i in range(61) if use_more_bits(i, 61)}
    assert _by_layer(t, "self_attn.kv_b_proj.weight", "Q6_K") == more  # attn_kv_b is attn_v-like
    assert _by_layer(t, "experts.255.down_proj.weight", "Q6_K") == more - {0, 1, 2}
    total = mix_bytes(deepseek_v3, "Q4_K_M")
    assert total == sum(plan_bytes_by_kind(deepseek_v3, {}, t).values())
    # bartowski/deepseek-ai_DeepSeek-V3-0324-GGUF, Q4_K_M: 404.43 GB (61 layers, no MTP layer, like moecc's)
    assert abs(total - 404.43e9) <= 0.005 * 404.43e9, total
    assert uniform_bytes(deepseek_v3, "Q4_K") < total  # the mix is ~27 GB above uniform Q4_K (377.82 GB)


def test_mixes_are_ordered_by_size(deepseek_v3) -> None:
    sizes = [mix_bytes(deepseek_v3, m) for m in ("Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_XXS", "IQ1_M", "IQ1_S")]
    assert sizes == sorted(sizes, reverse=True)
    assert set(MIXES) == {"Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_XXS", "IQ1_M", "IQ1_S"}


# ------------------------------------------------------------------------------------------ the baseline
RESERVES = {"kv_cache": 2048, "overhead": 512}


def _profile(**kw):
    return synthetic_profile(seed=4, **{**SMALL, "num_layers": 8, **kw})


@pytest.mark.parametrize("target", [Target.HF, Target.LLAMACPP])
def test_baseline_plan_has_the_mix_types(target: Target) -> None:
    p = _profile()
    types = mix_types(p.architecture, "Q4_K_M")
    need = mix_bytes(p.architecture, "Q4_K_M")
    budget = Budget(need + sum(RESERVES.values()), dict(RESERVES))
    plan = optimize(p, budget, FormulationOptions(target=target),
                    SolveOptions(solver="llamacpp_mix", baseline=BaselineOptions(mix="Q4_K_M")))
    assert {name: plan.formats[name] for name in types} == types  # plus the fixed tensors' F32
    assert plan.bytes.total == need
    assert all(lp.top_k == m.top_k and len(lp.kept_experts) == m.num_experts
               for lp, m in zip(plan.layers, p.architecture.moe_layers))
    # one byte short: the recipe cannot shrink, and says what it needs
    short = Budget(budget.total - 1, dict(RESERVES))
    with pytest.raises(InfeasibleError, match=f"baseline llamacpp_mix cannot fit .* llama.cpp Q4_K_M needs .*"
                                              f"\\({budget.total} bytes\\)"):
        optimize(p, short, FormulationOptions(target=target), SolveOptions(solver="llamacpp_mix"))


def test_baseline_refuses_a_mix_whose_types_are_not_candidates() -> None:
    p = _profile()  # candidates Q2_K, Q3_K, Q4_K, Q6_K, Q8_0, BF16
    inst = build_instance(p, Budget(10**15, {}), FormulationOptions(presolve=False))
    with pytest.raises(InputError, match=r"mix IQ1_S uses IQ1_S, IQ2_XXS, Q5_K, which are not among the candidate"):
        run_baseline("llamacpp_mix", inst, BaselineOptions(mix="IQ1_S"))
    with pytest.raises(InputError, match=r"mix Q3_K_M uses Q5_K, which is not among"):
        run_baseline("llamacpp_mix", inst, BaselineOptions(mix="Q3_K_M"))


def test_cli_solves_with_a_mix_and_refuses_a_bad_one(tmp_path, capsys) -> None:
    p = _profile()
    path = tmp_path / "profile.json"
    save_profile(p, path)
    out = tmp_path / "plan.json"
    base = ["solve", str(path), "-o", str(out), "--budget", "1GB", "--context", "0", "--overhead", "0",
            "--solver", "llamacpp_mix"]
    assert main([*base, "--mix", "q2_k", "--json"]) == 0
    assert '"solver": "llamacpp_mix"' in capsys.readouterr().out
    assert main([*base, "--mix", "Q5_K_M"]) == 2
    assert "unknown llama.cpp mix 'Q5_K_M'" in capsys.readouterr().err
    assert main([*base, "--mix", "IQ2_XXS"]) == 2
    assert "not among the candidate formats" in capsys.readouterr().err
