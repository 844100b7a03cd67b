"""Tiny random-init MoE checkpoints of the supported families, for unit tests.

``make_tiny_model(family, directory)`` writes ``config.json`` + ``model.safetensors``
(``save_pretrained``) and a byte-tokenizer marker, seeded, in well under a second.
Every family has 8 routed experts (top-2) in at least one layer, byte vocabulary.

    python -m runtime tiny deepseek_v3 /tmp/tiny-dsv3
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .byte_tokenizer import BOS_ID, PAD_ID, VOCAB_SIZE, save_byte_tokenizer

FAMILIES = ("deepseek_v3", "deepseek_v2", "glm4_moe_lite", "glm4_moe", "dots1", "solar_open", "qwen3_moe",
            "qwen2_moe", "mixtral", "olmoe", "flex_olmo")

_COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, bos_token_id=BOS_ID, eos_token_id=BOS_ID,
    pad_token_id=PAD_ID, tie_word_embeddings=False, use_cache=False, initializer_range=0.05,
)


def tiny_config(family: str):
    """transformers config of a tiny model of ``family``."""
    if family == "deepseek_v3":
        from transformers import DeepseekV3Config

        return DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=16,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
            first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=1.0,
            q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
            head_dim=8, rope_interleave=True)
    if family == "deepseek_v2":  # softmax scores, group-limited greedy, no renormalisation, scaled weights
        from transformers import DeepseekV2Config

        return DeepseekV2Config(
            **{**_COMMON, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=16,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
            topk_method="group_limited_greedy", first_k_dense_replace=1, norm_topk_prob=False,
            routed_scaling_factor=16.0, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8,
            v_head_dim=8, head_dim=8)
    if family == "glm4_moe_lite":  # DeepSeek-V3's MLA and routing; dense layers from mlp_layer_types
        from transformers import Glm4MoeLiteConfig

        return Glm4MoeLiteConfig(
            **{**_COMMON, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=16,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
            mlp_layer_types=["dense", "sparse", "sparse"], norm_topk_prob=True, routed_scaling_factor=1.8,
            q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    if family == "glm4_moe":  # DeepSeek-V3 routing (groups, score bias, scaled weights) under GQA with q/k/v biases
        from transformers import Glm4MoeConfig

        return Glm4MoeConfig(**_COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                             n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                             first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=2.5,
                             attention_bias=True, use_qk_norm=True)
    if family == "dots1":  # the same routing ungrouped; q/k norms; as llama.cpp's dots1, no GQA
        from transformers import Dots1Config

        return Dots1Config(**{**_COMMON, "num_key_value_heads": 4}, head_dim=8, intermediate_size=64,
                           moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                           n_group=1, topk_group=1, first_k_dense_replace=1, norm_topk_prob=True,
                           routed_scaling_factor=2.5, sliding_window=None)
    if family == "solar_open":  # the same routing ungrouped, an MoE block in every layer, q/k/v biases
        from transformers import SolarOpenConfig

        # experts of width 32: rows that every test format fits, as the solver may prune any expert of layer 0
        return SolarOpenConfig(**_COMMON, head_dim=8, moe_intermediate_size=32, n_routed_experts=8,
                               n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                               norm_topk_prob=True, routed_scaling_factor=2.0, attention_bias=True)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(**_COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
                              num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
                              decoder_sparse_step=1, mlp_only_layers=[0])
    if family == "qwen2_moe":
        from transformers import Qwen2MoeConfig

        return Qwen2MoeConfig(**_COMMON, intermediate_size=64, moe_intermediate_size=16,
                              shared_expert_intermediate_size=32, num_experts=8,
                              num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[0])
    if family == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(**_COMMON, intermediate_size=16, num_local_experts=8,
                             num_experts_per_tok=2)
    if family == "olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig(**_COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    if family == "flex_olmo":  # OLMoE's router and q/k norms, OLMo-2's post-norms
        from transformers import FlexOlmoConfig

        return FlexOlmoConfig(**_COMMON, intermediate_size=16, num_experts=8, num_experts_per_tok=2)
    raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")


def make_tiny_model(family: str, directory: str | Path, seed: int = 0, tie_word_embeddings: bool = False,
                    config_overrides: dict[str, Any] | None = None) -> Path:
    """Write a seeded tiny random ``family`` checkpoint into ``directory``; return it.

    ``tie_word_embeddings``: the output head shares the embedding (as SmolLM2, hence R3, does).
    ``config_overrides``: config attributes to set, e.g. ``{"mlp_only_layers": []}`` for a Qwen model whose
    every layer is MoE (llama.cpp's qwen2moe/qwen3moe have no dense layers)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    if tie_word_embeddings:
        config.tie_word_embeddings = True
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # Zero-initialised routers would route every token identically; use small noise.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight") and not param.any():
                    param.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True)
    save_byte_tokenizer(out)
    return out
