"""Architecture builders: exact tensor names/shapes against real save_pretrained checkpoints, and totals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from optimizer.architectures import architecture_from_config, load_architecture
from optimizer.errors import InputError
from optimizer.model_spec import BlockKind

DATA = Path(__file__).resolve().parents[2] / "optimizer" / "data" / "deepseek_v3"

# --- tiny random models saved by the installed transformers ------------------------------------------------

_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
_MLA = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4,
            intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2)
TINY = {
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_MLA, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=24)),
    "deepseek_v3_nolora_bias": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                                dict(_MLA, n_shared_experts=2, n_group=1, topk_group=1, first_k_dense_replace=2,
                                     q_lora_rank=None, attention_bias=True)),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                    dict(_MLA, n_shared_experts=2, first_k_dense_replace=1, q_lora_rank=None)),
    "deepseek_v2_lora": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                         dict(_MLA, n_shared_experts=1, first_k_dense_replace=0, q_lora_rank=24, n_group=2,
                              topk_group=1, tie_word_embeddings=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2, num_experts=4,
                       num_experts_per_tok=2, head_dim=16, decoder_sparse_step=1, mlp_only_layers=[0])),
    "qwen3_moe_step_bias": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                            dict(intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2,
                                 num_experts=4, num_experts_per_tok=2, head_dim=8, decoder_sparse_step=2,
                                 attention_bias=True, tie_word_embeddings=True)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=96, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=32, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                   attention_bias=True, eos_token_id=None)),
    "flex_olmo": ("FlexOlmoConfig", "FlexOlmoForCausalLM",
                  dict(intermediate_size=32, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                       attention_bias=True, pad_token_id=None, eos_token_id=None)),
    # DeepSeek-V3 routing under GQA; head_dim 32 != hidden / heads, as GLM-4.5's 128 != 5120 / 96
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2, head_dim=32,
                      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                      first_k_dense_replace=1, attention_bias=True)),
    "glm4_moe_qk_norm_tied": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                              dict(intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2,
                                   n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2,
                                   first_k_dense_replace=0, use_qk_norm=True, tie_word_embeddings=True)),
    # DeepSeek-V3's MLA and router; dense layers from mlp_layer_types (default: layer 0)
    "glm4_moe_lite": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
                      dict(_MLA, n_shared_experts=1, n_group=2, topk_group=1, q_lora_rank=24)),
    "glm4_moe_lite_types_bias": ("Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM",
                                 dict(_MLA, n_shared_experts=2, q_lora_rank=None, attention_bias=True,
                                      mlp_layer_types=["sparse", "dense", "sparse"], tie_word_embeddings=True)),
    # GLM-4-MoE's router and attention without q/k norms, MoE in every layer, no intermediate_size
    "solar_open": ("SolarOpenConfig", "SolarOpenForCausalLM",
                   dict(moe_intermediate_size=32, num_key_value_heads=2, head_dim=32, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, attention_bias=True)),
    "dots1": ("Dots1Config", "Dots1ForCausalLM",
              dict(intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2, n_routed_experts=8,
                   n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=2, attention_bias=True)),
}


def _save_tiny(case: str, directory: Path) -> dict[str, tuple[int, ...]]:
    """Save a tiny random model of ``case`` and return its checkpoint's {tensor name: shape}."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    config_cls, model_cls, kwargs = TINY[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**_COMMON, **kwargs)
    getattr(transformers, model_cls)(config).save_pretrained(directory)
    shapes = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(str(directory / name), "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


@pytest.mark.parametrize("case", sorted(TINY))
def test_blocks_equal_save_pretrained_checkpoint(case: str, tmp_path: Path) -> None:
    saved = _save_tiny(case, tmp_path)
    arch = load_architecture(tmp_path)  # reads the config.json save_pretrained wrote
    built = {b.name: b.shape for b in arch.blocks}
    assert len(built) == len(arch.blocks), "duplicate block names"
    assert sorted(built) == sorted(saved)
    assert built == saved
    # layer by layer: per-layer blocks are contiguous and increasing, embeddings first
    layers = [b.layer for b in arch.blocks if b.layer is not None]
    assert layers == sorted(layers)
    assert arch.blocks[0].kind == BlockKind.EMBEDDING
    assert arch.num_layers == 3
    # routed experts are complete per MoE layer
    for m in arch.moe_layers:
        experts = [b for b in arch.blocks if b.is_routed_expert and b.layer == m.index]
        assert len(experts) == m.num_experts * len(arch.expert_projections)
        assert {b.projection for b in experts} == set(arch.expert_projections)
    for b in arch.blocks:
        if b.kind in (BlockKind.NORM, BlockKind.ROUTER) or len(b.shape) == 1:
            assert not b.quantizable and b.fixed_format == "F32", b.name
        else:
            assert b.quantizable, b.name


def test_mixtral_uses_classic_names_with_standard_projections() -> None:
    arch = architecture_from_config(dict(MIXTRAL_8X7B, num_hidden_layers=1))
    by_name = {b.name: b for b in arch.blocks}
    assert by_name["model.layers.0.block_sparse_moe.experts.3.w1.weight"].projection == "gate_proj"
    assert by_name["model.layers.0.block_sparse_moe.experts.3.w3.weight"].projection == "up_proj"
    w2 = by_name["model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    assert (w2.projection, w2.shape, w2.expert) == ("down_proj", (4096, 14336), 3)
    assert by_name["model.layers.0.block_sparse_moe.gate.weight"].kind == BlockKind.ROUTER
    assert arch.expert_projections == ("gate_proj", "up_proj", "down_proj")


# --- real model sizes ---------------------------------------------------------------------------------------

DEEPSEEK_V3_HF = dict(
    model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
    moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1, num_attention_heads=128,
    num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
    topk_method="noaux_tc", n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1,
    first_k_dense_replace=3, norm_topk_prob=True, scoring_func="sigmoid", tie_word_embeddings=False,
)
MIXTRAL_8X7B = dict(
    model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
)
QWEN3_30B_A3B = dict(
    model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
    num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
    tie_word_embeddings=False,
)


def _close(value: float, target: float, rel: float) -> bool:
    return abs(value - target) <= rel * target


def test_deepseek_v3_reference_format_is_671b() -> None:
    arch = load_architecture(DATA / "config_671B.json")
    assert arch.family == "deepseek_v3"
    assert _close(arch.num_parameters, 671e9, 0.002), arch.num_parameters
    assert (arch.expert_groups, arch.topk_groups, arch.shared_experts) == (8, 4, 1)
    assert [m.index for m in arch.moe_layers] == list(range(3, 61))
    assert all((m.num_experts, m.top_k) == (256, 8) for m in arch.moe_layers)
    assert arch.kv_cache.kind == "mla" and arch.kv_cache.elements_per_token_per_layer == 576
    assert arch.kv_cache.num_layers == 61
    assert not any(".layers.61." in b.name for b in arch.blocks)  # no MTP layer
    assert "model.layers.3.mlp.gate.e_score_correction_bias" in {b.name for b in arch.blocks}
    assert arch.extra["score_func"] == "sigmoid"


def test_deepseek_v3_transformers_config_equals_reference_format() -> None:
    ref = load_architecture(DATA / "config_671B.json")
    hf = architecture_from_config(DEEPSEEK_V3_HF)
    assert hf.num_parameters == ref.num_parameters
    assert len(hf.blocks) == len(ref.blocks)
    assert hf.shape_hash() == ref.shape_hash()
    assert hf.extra["num_nextn_predict_layers"] == 1
    assert hf.extra["routed_scaling_factor"] == 2.5 and hf.extra["moe_intermediate_size"] == 2048


def test_reference_format_with_groups_and_softmax_is_deepseek_v2() -> None:
    """DeepSeek-V2 (236B) routes group-limited with softmax scores: expert groups alone do not make a V3."""
    config = json.loads((DATA / "config_16B.json").read_text())
    config.update(n_routed_experts=64, n_expert_groups=8, n_limited_groups=3)
    arch = architecture_from_config(config)
    assert arch.family == "deepseek_v2" and (arch.expert_groups, arch.topk_groups) == (8, 3)
    assert not any(b.name.endswith("e_score_correction_bias") for b in arch.blocks)
    assert architecture_from_config({**config, "score_func": "sigmoid"}).family == "deepseek_v3"


def test_deepseek_v2_lite_is_15_7b() -> None:
    arch = load_architecture(DATA / "config_16B.json")
    assert arch.family == "deepseek_v2"
    assert _close(arch.num_parameters, 15.7e9, 0.002), arch.num_parameters
    assert (arch.expert_groups, arch.topk_groups, arch.shared_experts) == (1, 1, 2)
    names = {b.name for b in arch.blocks}
    assert "model.layers.1.self_attn.q_proj.weight" in names and "model.layers.1.self_attn.q_a_proj.weight" not in names
    assert "model.layers.1.mlp.gate.e_score_correction_bias" not in names
    shared = next(b for b in arch.blocks if b.name == "model.layers.1.mlp.shared_experts.up_proj.weight")
    assert shared.shape == (2 * 1408, 2048)
    assert len(arch.moe_layers) == 26 and arch.moe_layers[0].top_k == 6


@pytest.mark.parametrize("config", ["config_671B.json", "config_16B.json"])
def test_llama_cpp_splits_deepseek_kv_b_into_rows_of_nope_and_kv_lora(config: str) -> None:
    from optimizer.architectures import all_gguf_row_lengths, gguf_row_lengths

    # V3 (q_lora, 128 heads) and V2-Lite (q_proj, 16 heads) both have qk_nope_head_dim 128, kv_lora_rank 512:
    # attn_k_b has rows of 128, attn_v_b of 512; every other block keeps its own row length
    arch = load_architecture(DATA / config)
    kv_b = [b for b in arch.blocks if b.projection == "kv_b_proj"]
    assert kv_b and all(gguf_row_lengths(arch, b) == (128, 512) for b in kv_b)
    assert all(gguf_row_lengths(arch, b) == (b.shape[-1],) for b in arch.blocks if b.projection != "kv_b_proj")
    assert all_gguf_row_lengths(arch) == [gguf_row_lengths(arch, b) for b in arch.blocks]  # one pass, same answer


def test_mixtral_8x7b_is_46_7b() -> None:
    arch = architecture_from_config(MIXTRAL_8X7B)
    assert _close(arch.num_parameters, 46.7e9, 0.002), arch.num_parameters
    assert arch.kv_cache.kind == "gqa" and arch.kv_cache.elements_per_token_per_layer == 2 * 8 * 128
    assert arch.shared_experts == 0 and len(arch.moe_layers) == 32


def test_qwen3_30b_a3b_is_30_5b() -> None:
    arch = architecture_from_config(QWEN3_30B_A3B)
    assert _close(arch.num_parameters, 30.5e9, 0.003), arch.num_parameters
    assert arch.kv_cache.elements_per_token_per_layer == 2 * 4 * 128
    assert len(arch.moe_layers) == 48 and arch.moe_layers[0].num_experts == 128


# The architecture keys of GLM-4.5-Air and dots.llm1 as in stored public copies of their configs (search index
# file ids 54377337437: a Glm4MoeForCausalLM conversion script's CONFIG, hidden 4096 / 96 heads / 128 experts /
# 46 layers; 55020445748: a trimmed dots.llm1.inst config in a loader's unit test); published totals 106B / 142B.
GLM_4_5_AIR = dict(
    model_type="glm4_moe", vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8, head_dim=128, n_routed_experts=128,
    n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1, first_k_dense_replace=1,
    routed_scaling_factor=1.0, norm_topk_prob=True, attention_bias=True, use_qk_norm=False,
    num_nextn_predict_layers=1, partial_rotary_factor=0.5, tie_word_embeddings=False,
)
DOTS_LLM1 = dict(
    model_type="dots1", vocab_size=152064, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=62, num_attention_heads=32, num_key_value_heads=32, n_routed_experts=128, n_shared_experts=2,
    num_experts_per_tok=6, n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5,
    norm_topk_prob=True, attention_bias=False, tie_word_embeddings=False,
)


def test_glm_4_5_air_is_106b_without_its_mtp_layer() -> None:
    arch = architecture_from_config(GLM_4_5_AIR)
    assert _close(arch.num_parameters, 106e9, 0.01), arch.num_parameters
    assert [m.index for m in arch.moe_layers] == list(range(1, 46)) and arch.moe_layers[0].top_k == 8
    assert arch.kv_cache.kind == "gqa" and arch.kv_cache.elements_per_token_per_layer == 2 * 8 * 128
    assert (arch.expert_groups, arch.topk_groups, arch.shared_experts) == (1, 1, 1)
    names = {b.name: b for b in arch.blocks}
    assert names["model.layers.1.self_attn.q_proj.weight"].shape == (96 * 128, 4096)
    assert "model.layers.1.self_attn.q_proj.bias" in names and "model.layers.1.self_attn.o_proj.bias" not in names
    assert "model.layers.1.self_attn.q_norm.weight" not in names  # use_qk_norm false
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in names
    assert not any(".layers.46." in n for n in names)  # the MTP layer is left out
    assert arch.extra["score_func"] == "sigmoid" and arch.extra["num_key_value_heads"] == 8


def test_dots_llm1_is_142b() -> None:
    arch = architecture_from_config(DOTS_LLM1)
    assert _close(arch.num_parameters, 142e9, 0.01), arch.num_parameters
    assert len(arch.moe_layers) == 61 and arch.moe_layers[0].index == 1 and arch.shared_experts == 2
    names = {b.name: b for b in arch.blocks}
    assert names["model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (2 * 1408, 4096)
    assert names["model.layers.1.self_attn.k_norm.weight"].shape == (128,)  # per head, always


def test_glm_4_7_flash_is_30b_without_its_mtp_layer() -> None:
    """GLM-4.7-Flash (glm4_moe_lite): transformers' config defaults are its sizes; ~30B (30B-A3B)."""
    from transformers import Glm4MoeLiteConfig

    config = Glm4MoeLiteConfig().to_dict()
    del config["mlp_layer_types"]  # absent: layer 0 dense, as transformers fills it in
    arch = architecture_from_config(dict(config, num_nextn_predict_layers=1, first_k_dense_replace=5))
    assert _close(arch.num_parameters, 30e9, 0.01), arch.num_parameters
    assert [m.index for m in arch.moe_layers] == list(range(1, 47))  # first_k_dense_replace is not read
    assert arch.kv_cache.kind == "mla" and arch.kv_cache.elements_per_token_per_layer == 512 + 64
    assert arch.extra["score_func"] == "sigmoid" and arch.shared_experts == 1
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in {b.name for b in arch.blocks}
    assert not any(".layers.47." in b.name for b in arch.blocks)
    types = ["dense", "sparse", "dense"] + ["sparse"] * 44
    assert [m.index for m in architecture_from_config(dict(config, mlp_layer_types=types)).moe_layers][:2] == [1, 3]
    with pytest.raises(InputError, match="'mlp_layer_types' must list 'dense' or 'sparse' for each of the 47"):
        architecture_from_config(dict(config, mlp_layer_types=["sparse"] * 46))
    with pytest.raises(InputError, match="no MoE layers"):
        architecture_from_config(dict(config, mlp_layer_types=["dense"] * 47))


def test_solar_open_is_102b() -> None:
    """Solar Open 100B (solar_open): transformers' config defaults are its sizes (102.6B published)."""
    from transformers import SolarOpenConfig

    config = SolarOpenConfig().to_dict()
    arch = architecture_from_config(config)
    assert _close(arch.num_parameters, 102.6e9, 0.005), arch.num_parameters
    assert [m.index for m in arch.moe_layers] == list(range(48)) and arch.moe_layers[0].top_k == 8
    assert arch.kv_cache.kind == "gqa" and arch.kv_cache.elements_per_token_per_layer == 2 * 8 * 128
    names = {b.name: b for b in arch.blocks}
    assert names["model.layers.0.self_attn.q_proj.weight"].shape == (64 * 128, 4096)
    assert "model.layers.0.self_attn.q_norm.weight" not in names
    # head_dim and the key/value heads default to the config class's 128 and 8, not hidden / heads and heads
    bare = {k: v for k, v in config.items() if k not in ("head_dim", "num_key_value_heads")}
    assert architecture_from_config(bare).num_parameters == arch.num_parameters


def test_tied_embeddings_drop_lm_head() -> None:
    tied = architecture_from_config(dict(QWEN3_30B_A3B, tie_word_embeddings=True))
    assert not tied.blocks_of_kind([BlockKind.LM_HEAD])
    assert architecture_from_config(QWEN3_30B_A3B).num_parameters - tied.num_parameters == 151936 * 2048


# --- errors -------------------------------------------------------------------------------------------------

def test_unknown_model_type() -> None:
    with pytest.raises(InputError, match="unsupported model_type 'llama'"):
        architecture_from_config({"model_type": "llama"})
    with pytest.raises(InputError, match="model_type"):
        architecture_from_config({"hidden_size": 4})


@pytest.mark.parametrize("key", ["hidden_size", "moe_intermediate_size", "kv_lora_rank", "n_routed_experts"])
def test_missing_key_is_named(key: str) -> None:
    config = {k: v for k, v in DEEPSEEK_V3_HF.items() if k != key}
    with pytest.raises(InputError, match=f"missing key '{key}'"):
        architecture_from_config(config)


def test_missing_reference_key_is_named() -> None:
    config = json.loads((DATA / "config_16B.json").read_text())
    del config["moe_inter_dim"]
    with pytest.raises(InputError, match="'moe_inter_dim'"):
        architecture_from_config(config)


@pytest.mark.parametrize("value", [0, -3, 2.5, "64", True])
def test_non_positive_or_non_integer_sizes(value: object) -> None:
    with pytest.raises(InputError, match="'hidden_size' must be"):
        architecture_from_config(dict(MIXTRAL_8X7B, hidden_size=value))


def test_inconsistent_routing() -> None:
    with pytest.raises(InputError, match="num_experts_per_tok"):
        architecture_from_config(dict(MIXTRAL_8X7B, num_experts_per_tok=9))
    with pytest.raises(InputError, match="n_group"):
        architecture_from_config(dict(DEEPSEEK_V3_HF, n_group=7))


def test_load_architecture_file_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such config"):
        load_architecture(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read JSON"):
        load_architecture(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(MIXTRAL_8X7B, num_hidden_layers=2)))
    assert load_architecture(tmp_path).num_layers == 2


def test_deepseek_moe_layer_freq() -> None:
    arch = architecture_from_config(dict(DEEPSEEK_V3_HF, num_hidden_layers=8, first_k_dense_replace=1,
                                         moe_layer_freq=2))
    assert [m.index for m in arch.moe_layers] == [2, 4, 6]
    assert "model.layers.3.mlp.gate_proj.weight" in {b.name for b in arch.blocks}


def _transformers_moe_types() -> list[str]:
    """Causal-LM model types of the installed transformers whose config takes an expert count (its own registry)."""
    import inspect

    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            params = inspect.signature(CONFIG_MAPPING[model_type].__init__).parameters
        except (KeyError, ValueError):
            continue
        if any("expert" in p for p in params):
            out.append(model_type)
    return out


def test_every_transformers_moe_type_is_supported_or_refused_by_name() -> None:
    """Enumerated from transformers' registry, not a hand list: each MoE type is one of ours, or a config of it
    is refused in one line naming it and what is supported (README lists both)."""
    from optimizer.architectures import supported_model_types

    moe = _transformers_moe_types()
    supported = supported_model_types()
    assert set(supported) <= set(moe), set(supported) - set(moe)
    assert {"glm4_moe", "dots1", "flex_olmo", "glm4_moe_lite", "solar_open"} <= set(supported)
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    listed = readme.split("## Supported models", 1)[1].split("\n## ", 1)[0]
    assert all(f"`{t}`" in listed for t in supported), [t for t in supported if f"`{t}`" not in listed]
    for model_type in sorted(set(moe) - set(supported)):
        with pytest.raises(InputError, match=f"^config: unsupported model_type '{model_type}'; supported: "
                                             f"{', '.join(supported)}$"):
            architecture_from_config({"model_type": model_type})
