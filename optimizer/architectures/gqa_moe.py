"""Grouped-query-attention MoE families with softmax routers: ``qwen3_moe``, ``qwen2_moe``, ``mixtral``,
``olmoe`` and ``flex_olmo``.

Tensor names are the ones transformers' ``save_pretrained`` writes (the per-expert checkpoint layout); for
Mixtral that is ``block_sparse_moe.experts.{e}.w1/w2/w3`` and ``block_sparse_moe.gate``. Mixtral's
``w1``, ``w3``, ``w2`` blocks carry the projections ``gate_proj``, ``up_proj``, ``down_proj`` so that every
family shares :attr:`Architecture.expert_projections`. FlexOlmo is OLMoE with OLMo-2's norm placement: no
``input_layernorm``; ``post_attention_layernorm`` and ``post_feedforward_layernorm`` normalise the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from ..model_spec import MAX_EXPERTS, MAX_LAYERS, Architecture, BlockKind, MoELayer
from ._common import BlockList, ConfigReader, GQAAttention, check_layout, gqa_attention, gqa_dims

GQA_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "flex_olmo")
MIXTRAL_TENSORS = ("w1", "w3", "w2")  # gate, up, down

_EXTRA_KEYS = (
    "intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_experts_per_tok", "num_experts", "num_local_experts", "tie_word_embeddings", "attention_bias",
    "qkv_bias", "router_jitter_noise", "sliding_window",
)


@dataclass(frozen=True)
class _Layout:
    """What differs between the families."""

    moe_prefix: str  # "mlp" or "block_sparse_moe"
    expert_tensors: tuple[str, str, str]  # checkpoint names of gate, up, down
    attention: GQAAttention
    shared_expert: bool  # Qwen2-MoE's shared_expert + shared_expert_gate
    sparse_step: bool  # decoder_sparse_step / mlp_only_layers pick the MoE layers
    expert_inter_key: str
    post_norms: bool = False  # OLMo-2 placement (FlexOlmo): norms after attention and MLP, none before


_MLP = ("gate_proj", "up_proj", "down_proj")
_OLMOE_ATTENTION = GQAAttention("full", None, "attention_bias", False, True)
LAYOUTS = {
    "qwen3_moe": _Layout("mlp", _MLP, GQAAttention("head", None, "attention_bias", False, True), False, True,
                         "moe_intermediate_size"),
    "qwen2_moe": _Layout("mlp", _MLP, GQAAttention(None, None, "qkv_bias", True, False), True, True,
                         "moe_intermediate_size"),
    "mixtral": _Layout("block_sparse_moe", MIXTRAL_TENSORS, GQAAttention(None, None, None, False, False), False,
                       False, "intermediate_size"),
    "olmoe": _Layout("mlp", _MLP, _OLMOE_ATTENTION, False, False, "intermediate_size"),
    "flex_olmo": _Layout("mlp", _MLP, _OLMOE_ATTENTION, False, False, "intermediate_size", post_norms=True),
}


def _is_moe_layer(layer: int, lay: _Layout, step: int, mlp_only: list[int]) -> bool:
    if not lay.sparse_step:
        return True
    return layer not in mlp_only and (layer + 1) % step == 0


def gqa_moe_from_hf(config: dict, where: str = "config") -> Architecture:
    """An architecture of one of :data:`GQA_FAMILIES` from a transformers ``config.json`` dict."""
    family = config.get("model_type")
    if family not in LAYOUTS:
        raise InputError(f"{where}: model_type must be one of {GQA_FAMILIES}, got {family!r}")
    lay = LAYOUTS[family]
    r = ConfigReader(config, f"{where} ({family})")
    hidden, vocab = r.int("hidden_size"), r.int("vocab_size")
    num_layers = r.int("num_hidden_layers", maximum=MAX_LAYERS)
    dims = gqa_dims(r, hidden, lay.attention)
    num_experts = r.first_int(("num_local_experts", "num_experts"), maximum=MAX_EXPERTS)
    top_k = r.int("num_experts_per_tok", maximum=MAX_EXPERTS)
    if top_k > num_experts:
        raise InputError(f"{r.where}: num_experts_per_tok={top_k} exceeds the {num_experts} experts")
    expert_inter = r.int(lay.expert_inter_key)
    dense_inter = r.int("intermediate_size") if lay.sparse_step else expert_inter
    step = r.int("decoder_sparse_step", 1, maximum=MAX_LAYERS) if lay.sparse_step else 1
    mlp_only = r.int_list("mlp_only_layers") if lay.sparse_step else []
    shared_inter = r.int("shared_expert_intermediate_size", 0, minimum=0) if lay.shared_expert else 0
    tied = r.bool("tie_word_embeddings", False)
    check_layout(r.where, num_layers, num_experts)

    out = BlockList(r.where)
    out.embeddings(vocab, hidden)
    moe_layers = []
    for layer in range(num_layers):
        p = f"model.layers.{layer}"
        if not lay.post_norms:
            out.norm(f"{p}.input_layernorm.weight", hidden, layer)
        gqa_attention(out, f"{p}.self_attn", layer, hidden, dims, lay.attention)
        out.norm(f"{p}.post_attention_layernorm.weight", hidden, layer)
        if lay.post_norms:
            out.norm(f"{p}.post_feedforward_layernorm.weight", hidden, layer)
        if not _is_moe_layer(layer, lay, step, mlp_only):
            out.mlp(f"{p}.mlp", BlockKind.DENSE_MLP, dense_inter, hidden, layer)
            continue
        m = f"{p}.{lay.moe_prefix}"
        moe_layers.append(MoELayer(layer, num_experts, top_k))
        out.fixed(f"{m}.gate.weight", BlockKind.ROUTER, (num_experts, hidden), layer)
        for e in range(num_experts):
            out.mlp(f"{m}.experts.{e}", BlockKind.ROUTED_EXPERT, expert_inter, hidden, layer, e, lay.expert_tensors)
        if shared_inter:
            out.mlp(f"{m}.shared_expert", BlockKind.SHARED_EXPERT, shared_inter, hidden, layer)
            out.fixed(f"{m}.shared_expert_gate.weight", BlockKind.ROUTER, (1, hidden), layer)
    out.head(vocab, hidden, tied)
    if not moe_layers:
        raise InputError(f"{r.where}: no MoE layers (check decoder_sparse_step and mlp_only_layers)")

    extra = r.extra(_EXTRA_KEYS)
    extra.update(dims.extra(), score_func="softmax")
    if family == "mixtral":
        extra["expert_tensor_names"] = dict(zip(_MLP, MIXTRAL_TENSORS))
    return Architecture(
        family=family, num_layers=num_layers, hidden_size=hidden, vocab_size=vocab, moe_layers=tuple(moe_layers),
        shared_experts=1 if shared_inter else 0, blocks=tuple(out.blocks),
        kv_cache=dims.kv_cache(num_layers), extra=extra,
    )
