"""Llama (dense) -> Qwen2-MoE: config and weights.

Why Qwen2-MoE (``Qwen2MoeForCausalLM``) and not the other families the optimizer supports:

* Attention must stay bit-identical to Llama's (GQA, RoPE over the whole head, no biases, no
  q/k norm).  Qwen2-MoE and Mixtral have exactly that (``qkv_bias=False``); Qwen3-MoE and
  OLMoE RMS-normalise q and k; DeepSeek-V3 uses MLA with a single shared RoPE key and a
  normalised KV latent, which cannot express Llama's three RoPE'd KV heads.
* The routed experts must be weighted 1 whatever the top-k, so that all experts active
  reproduces the dense FFN and top-k < E means "drop the least useful neuron groups".
  Mixtral always renormalises over the k chosen experts (weights ~1/k: the output would
  depend on k by a factor).  Qwen2-MoE with ``norm_topk_prob=False`` weights expert e by its
  softmax probability over all E experts; with router logits within +-1e-4 that is 1/E to
  within 2e-4 for every k, and scaling the experts' down projections by E (a power of two,
  bit-exact) makes each selected expert's weight 1 +- 2e-4, while the ranking of the logits
  (the fitted router, ``router.py``) still decides which experts run.
* Qwen2-MoE has a gated shared expert, ``sigmoid(shared_expert_gate . x) * shared_expert(x)``:
  with the gate weight 0 it is exactly 1/2, so its down projection is scaled by 2 and it holds
  the always-on neurons (``split.py``).

Caveat for expert *dropping*: a Qwen2-MoE router renormalises its softmax over the experts
that are left, so deleting m of E experts from this model scales every routed expert's
weight by E/(E-m) (the logits are nearly uniform).  Masking / top-k changes do not.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


def moe_config(dense: Any, num_experts: int, top_k: int, expert_size: int, shared_size: int):
    """``Qwen2MoeConfig`` with the dense Llama config's attention, norms, rope and vocabulary."""
    from transformers import Qwen2MoeConfig

    head_dim = getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads
    if head_dim * dense.num_attention_heads != dense.hidden_size:
        raise ValueError("Qwen2-MoE needs head_dim * num_attention_heads == hidden_size")
    if getattr(dense, "attention_bias", False) or getattr(dense, "mlp_bias", False):
        raise ValueError("dense model has attention/MLP biases; this converter expects none")
    if dense.hidden_act != "silu":
        raise ValueError(f"expected a SwiGLU (silu) FFN, got {dense.hidden_act!r}")
    return Qwen2MoeConfig(
        vocab_size=dense.vocab_size, hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size, num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads, num_key_value_heads=dense.num_key_value_heads,
        hidden_act="silu", max_position_embeddings=dense.max_position_embeddings,
        rms_norm_eps=dense.rms_norm_eps, tie_word_embeddings=bool(dense.tie_word_embeddings),
        rope_parameters=dict(dense.rope_parameters), use_sliding_window=False,
        decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=expert_size,
        shared_expert_intermediate_size=shared_size, num_experts=num_experts, num_experts_per_tok=top_k,
        norm_topk_prob=False, qkv_bias=False, output_router_logits=False,
        bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id, pad_token_id=dense.pad_token_id,
        use_cache=True, dtype="float32",
    )


def layer_state(prefix: str, experts: dict[str, torch.Tensor], router: torch.Tensor) -> dict[str, torch.Tensor]:
    """In-memory Qwen2-MoE tensors of one MoE block (``prefix`` = ``model.layers.{l}.mlp``)."""
    return {
        f"{prefix}.gate.weight": router,
        f"{prefix}.experts.gate_up_proj": experts["gate_up_proj"],
        f"{prefix}.experts.down_proj": experts["down_proj"],
        f"{prefix}.shared_expert.gate_proj.weight": experts["shared_gate_proj"],
        f"{prefix}.shared_expert.up_proj.weight": experts["shared_up_proj"],
        f"{prefix}.shared_expert.down_proj.weight": experts["shared_down_proj"],
        f"{prefix}.shared_expert_gate.weight": torch.zeros(1, router.shape[1], dtype=router.dtype),
    }


def assemble(config: Any, dense_state: dict[str, torch.Tensor], moe_layers: Sequence[dict[str, torch.Tensor]]):
    """``Qwen2MoeForCausalLM`` with the dense non-FFN weights and the given per-layer MoE tensors."""
    from transformers import Qwen2MoeForCausalLM

    state = {k: v for k, v in dense_state.items() if ".mlp." not in k}
    for layer_tensors in moe_layers:
        state.update(layer_tensors)
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    model = Qwen2MoeForCausalLM(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def set_top_k(model: nn.Module, k: int) -> None:
    """Route every MoE layer to ``k`` experts (config and each router)."""
    model.config.num_experts_per_tok = k
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "top_k"):
            if not 1 <= k <= gate.num_experts:
                raise ValueError(f"top-k {k} outside 1..{gate.num_experts}")
            gate.top_k = k
