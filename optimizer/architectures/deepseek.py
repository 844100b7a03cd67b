"""DeepSeek-V2 / V3 (multi-head latent attention): transformers configs and the reference-inference format;
GLM-4-MoE-Lite (``glm4_moe_lite``, GLM-4.7-Flash), which is DeepSeek-V3's MLA and router with its dense layers
named by ``mlp_layer_types``.

Tensor names are the ones ``save_pretrained`` writes (and the published checkpoints use). The multi-token
prediction layer of DeepSeek-V3 (``num_nextn_predict_layers``, stored as layer 61 in the published
checkpoint) is not part of the model transformers builds and is left out (GLM-4-MoE-Lite's too).

The MoE side (:class:`DeepSeekMoE`, :func:`deepseek_layers`: leading dense layers, a router with DeepSeek-V3's
``e_score_correction_bias``, routed experts, ``shared_experts``) is shared with the families that route the
same way under grouped-query attention (:mod:`.deepseek_gqa`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import InputError
from ..model_spec import MAX_EXPERTS, MAX_LAYERS, Architecture, Block, BlockKind, KVCacheSpec, MoELayer
from ._common import BlockList, ConfigReader, check_layout

DEEPSEEK_FAMILIES = ("deepseek_v2", "deepseek_v3")
#: every family with DeepSeek's multi-head latent attention (built by :func:`deepseek_from_hf`)
MLA_FAMILIES = DEEPSEEK_FAMILIES + ("glm4_moe_lite",)

#: config keys of the DeepSeek MoE layout kept in :attr:`Architecture.extra`
MOE_EXTRA_KEYS = (
    "intermediate_size", "moe_intermediate_size", "routed_scaling_factor", "norm_topk_prob",
    "num_nextn_predict_layers", "first_k_dense_replace", "n_routed_experts", "n_shared_experts",
    "num_experts_per_tok", "n_group", "topk_group", "tie_word_embeddings",
)
_EXTRA_KEYS = MOE_EXTRA_KEYS + (
    "topk_method", "moe_layer_freq", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "num_attention_heads", "mlp_layer_types",
)


@dataclass(frozen=True)
class DeepSeekMoE:
    """DeepSeek's MoE layout, read from a config: which layers route, to how many experts, in which groups."""

    num_experts: int
    top_k: int
    shared: int  # n_shared_experts: one shared MLP of moe_inter * shared
    first_dense: int  # first_k_dense_replace
    freq: int  # moe_layer_freq (1 where the family has none)
    groups: int
    topk_groups: int
    inter: int  # dense layers' intermediate_size
    moe_inter: int
    mlp_bias: bool  # dense and shared MLPs' biases
    score_bias: bool  # the router's e_score_correction_bias (DeepSeek-V3's sigmoid routing)
    sparse: tuple[bool, ...] | None = None  # per layer, whether it routes (mlp_layer_types); None: the rule above

    def is_moe(self, layer: int) -> bool:
        if self.sparse is not None:
            return self.sparse[layer]
        return layer >= self.first_dense and layer % self.freq == 0


def read_deepseek_moe(r: ConfigReader, num_layers: int, *, score_bias: bool, first_dense_default: int = 0,
                      shared_default: int | None = 0, layer_freq: bool = False, mlp_bias: bool = False,
                      dense: str = "first_k") -> DeepSeekMoE:
    """The :class:`DeepSeekMoE` of a config, checked: groups divide the experts, k fits, the layout is bounded.

    The defaults are the family's transformers defaults for a key the config lacks: ``first_dense_default``
    for ``first_k_dense_replace``; ``shared_default`` for ``n_shared_experts`` (0 allows none; a positive
    default, or None for a required key, means the family always builds a shared MLP, so at least 1).
    ``layer_freq``: the family reads ``moe_layer_freq``. ``dense``: which layers are dense, as the family's
    transformers code decides: ``"first_k"`` the leading ``first_k_dense_replace``; ``"mlp_layer_types"`` the
    ``"dense"`` entries of that list (GLM-4-MoE-Lite; absent: the leading ``first_dense_default``, and
    ``first_k_dense_replace`` is not read); ``"none"`` no layer (Solar Open; ``intermediate_size`` not read)."""
    if shared_default is None:
        shared = r.int("n_shared_experts", maximum=MAX_EXPERTS)
    else:
        shared = r.int("n_shared_experts", shared_default, minimum=min(shared_default, 1), maximum=MAX_EXPERTS)
    sparse = None
    if dense == "first_k":
        first_dense = r.int("first_k_dense_replace", first_dense_default, minimum=0, maximum=MAX_LAYERS)
    elif dense == "mlp_layer_types":
        sparse = _mlp_layer_types(r, num_layers, first_dense_default)
        first_dense = next((i for i, s in enumerate(sparse) if s), num_layers)
    elif dense == "none":
        first_dense = 0
    else:
        raise ValueError(f"unknown dense rule {dense!r}")
    moe = DeepSeekMoE(
        num_experts=r.first_int(("n_routed_experts", "num_local_experts"), maximum=MAX_EXPERTS),
        top_k=r.int("num_experts_per_tok", maximum=MAX_EXPERTS), shared=shared, first_dense=first_dense,
        freq=r.int("moe_layer_freq", 1, maximum=MAX_LAYERS) if layer_freq else 1,
        groups=r.int("n_group", 1, maximum=MAX_EXPERTS), topk_groups=r.int("topk_group", 1, maximum=MAX_EXPERTS),
        inter=r.int("intermediate_size") if dense != "none" else 0, moe_inter=r.int("moe_intermediate_size"),
        mlp_bias=mlp_bias, score_bias=score_bias, sparse=sparse,
    )
    _check_routing(r.where, moe.num_experts, moe.top_k, moe.groups, moe.topk_groups)
    check_layout(r.where, num_layers, moe.num_experts)
    return moe


def _mlp_layer_types(r: ConfigReader, num_layers: int, first_dense_default: int) -> tuple[bool, ...]:
    """``mlp_layer_types`` (``"dense"`` / ``"sparse"`` per layer) as flags; absent: the first
    ``first_dense_default`` layers dense, as the family's config fills it in."""
    value = r.get("mlp_layer_types")
    if value is None:
        return tuple(layer >= first_dense_default for layer in range(num_layers))
    if (not isinstance(value, list) or len(value) != num_layers
            or not all(v in ("dense", "sparse") for v in value)):
        raise InputError(f"{r.where}: 'mlp_layer_types' must list 'dense' or 'sparse' for each of the {num_layers} "
                         f"layers, got {value!r}")
    return tuple(v == "sparse" for v in value)


def deepseek_layers(out: BlockList, moe: DeepSeekMoE, num_layers: int, hidden: int,
                    attention: Callable[[str, int], None]) -> tuple[MoELayer, ...]:
    """Every decoder layer's blocks, in module order: norms around ``attention(prefix, layer)`` (which adds the
    attention module's blocks), then a dense MLP or the MoE block. Returns the MoE layers (at least one)."""
    moe_layers = []
    for layer in range(num_layers):
        p = f"model.layers.{layer}"
        out.norm(f"{p}.input_layernorm.weight", hidden, layer)
        attention(f"{p}.self_attn", layer)
        out.norm(f"{p}.post_attention_layernorm.weight", hidden, layer)
        if not moe.is_moe(layer):
            out.mlp(f"{p}.mlp", BlockKind.DENSE_MLP, moe.inter, hidden, layer, bias=moe.mlp_bias)
            continue
        moe_layers.append(MoELayer(layer, moe.num_experts, moe.top_k))
        out.fixed(f"{p}.mlp.gate.weight", BlockKind.ROUTER, (moe.num_experts, hidden), layer)
        if moe.score_bias:
            out.fixed(f"{p}.mlp.gate.e_score_correction_bias", BlockKind.ROUTER, (moe.num_experts,), layer)
        for e in range(moe.num_experts):
            out.mlp(f"{p}.mlp.experts.{e}", BlockKind.ROUTED_EXPERT, moe.moe_inter, hidden, layer, e)
        if moe.shared:
            out.mlp(f"{p}.mlp.shared_experts", BlockKind.SHARED_EXPERT, moe.moe_inter * moe.shared, hidden, layer,
                    bias=moe.mlp_bias)
    if not moe_layers:
        rule = ("every mlp_layer_types entry 'dense'" if moe.sparse is not None
                else f"first_k_dense_replace={moe.first_dense} >= {num_layers} layers")
        raise InputError(f"{out.where}: no MoE layers ({rule})")
    return tuple(moe_layers)


def _mla_attention(out: BlockList, r: ConfigReader, p: str, layer: int, hidden: int) -> None:
    """The MLA projections and their norms, in module order."""
    heads = r.int("num_attention_heads")
    q_lora = r.int("q_lora_rank", 0, minimum=0)
    kv_lora = r.int("kv_lora_rank")
    nope, rope, v_dim = r.int("qk_nope_head_dim"), r.int("qk_rope_head_dim"), r.int("v_head_dim")
    bias = r.bool("attention_bias", False)
    a = BlockKind.ATTENTION
    if q_lora:
        out.linear(f"{p}.q_a_proj", a, q_lora, hidden, layer, bias, "q_a_proj")
        out.norm(f"{p}.q_a_layernorm.weight", q_lora, layer)
        out.linear(f"{p}.q_b_proj", a, heads * (nope + rope), q_lora, layer, False, "q_b_proj")
    else:
        out.linear(f"{p}.q_proj", a, heads * (nope + rope), hidden, layer, False, "q_proj")
    out.linear(f"{p}.kv_a_proj_with_mqa", a, kv_lora + rope, hidden, layer, bias, "kv_a_proj_with_mqa")
    out.norm(f"{p}.kv_a_layernorm.weight", kv_lora, layer)
    out.linear(f"{p}.kv_b_proj", a, heads * (nope + v_dim), kv_lora, layer, False, "kv_b_proj")
    out.linear(f"{p}.o_proj", a, hidden, heads * v_dim, layer, bias, "o_proj")


def kv_b_gguf_rows(arch: Architecture, block: Block,
                   shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[int, ...]:
    """Row lengths of the GGUF tensors llama.cpp's converter writes for an MLA ``kv_b_proj`` block: it splits
    the ``[heads * (nope + v), kv_lora]`` weight into ``attn_k_b`` (per head ``[kv_lora, nope]``: rows of
    ``qk_nope_head_dim``) and ``attn_v_b`` (per head ``[v, kv_lora]``: rows of ``kv_lora_rank``), so a format must
    divide both. ``nope`` is solved from the layer's shapes (a profile's architecture keeps no config):
    ``heads * nope = kv_b rows - o_proj cols``, ``heads * rope = q rows - heads * nope``, ``rope = kv_a rows -
    kv_lora``. Any other block, or shapes that do not solve to whole numbers: ``(its row length,)``.
    ``shapes``: the 2-D blocks' shapes of the block's layer by projection, when the caller has them."""
    own = (block.shape[-1],)
    if block.projection != "kv_b_proj":
        return own
    if shapes is None:
        shapes = {b.projection: b.shape for b in arch.blocks if b.layer == block.layer and len(b.shape) == 2}
    q = shapes.get("q_b_proj") or shapes.get("q_proj")
    if q is None or "o_proj" not in shapes or "kv_a_proj_with_mqa" not in shapes:
        return own
    kv_lora = block.shape[1]
    heads_nope = block.shape[0] - shapes["o_proj"][1]
    heads_rope = q[0] - heads_nope
    rope = shapes["kv_a_proj_with_mqa"][0] - kv_lora
    if rope <= 0 or heads_rope <= 0 or heads_nope <= 0 or heads_rope % rope or heads_nope % (heads_rope // rope):
        return own
    return heads_nope // (heads_rope // rope), kv_lora


def deepseek_from_hf(config: dict, where: str = "config") -> Architecture:
    """A DeepSeek-V2/V3 or GLM-4-MoE-Lite architecture from a transformers ``config.json`` dict."""
    family = config.get("model_type")
    if family not in MLA_FAMILIES:
        raise InputError(f"{where}: model_type must be one of {MLA_FAMILIES}, got {family!r}")
    r = ConfigReader(config, f"{where} ({family})")
    hidden, vocab = r.int("hidden_size"), r.int("vocab_size")
    num_layers = r.int("num_hidden_layers", maximum=MAX_LAYERS)
    if family == "glm4_moe_lite":  # no moe_layer_freq, no MLP biases, always a shared MLP; layer 0 dense by default
        moe = read_deepseek_moe(r, num_layers, score_bias=True, first_dense_default=1, shared_default=1,
                                dense="mlp_layer_types")
    else:
        moe = read_deepseek_moe(r, num_layers, score_bias=family == "deepseek_v3", layer_freq=True,
                                mlp_bias=r.bool("mlp_bias", False))
    tied = r.bool("tie_word_embeddings", False)
    r.int("num_attention_heads"), r.int("kv_lora_rank"), r.int("qk_rope_head_dim")  # fail early on bad sizes

    out = BlockList(r.where)
    out.embeddings(vocab, hidden)
    moe_layers = deepseek_layers(out, moe, num_layers, hidden,
                                 lambda prefix, layer: _mla_attention(out, r, prefix, layer, hidden))
    out.head(vocab, hidden, tied)

    extra = r.extra(_EXTRA_KEYS)
    if family == "glm4_moe_lite":  # transformers' router is sigmoid whatever the config says
        extra["score_func"] = "sigmoid"
    else:
        extra["score_func"] = r.get("scoring_func", "sigmoid" if family == "deepseek_v3" else "softmax")
    extra["attention"] = "mla"
    kv = KVCacheSpec("mla", r.int("kv_lora_rank") + r.int("qk_rope_head_dim"), num_layers)
    return Architecture(
        family=family, num_layers=num_layers, hidden_size=hidden, vocab_size=vocab, moe_layers=moe_layers,
        shared_experts=moe.shared, blocks=tuple(out.blocks), kv_cache=kv, expert_groups=moe.groups,
        topk_groups=moe.topk_groups, extra=extra,
    )


def _check_routing(where: str, num_experts: int, top_k: int, groups: int, topk_groups: int) -> None:
    if top_k > num_experts:
        raise InputError(f"{where}: num_experts_per_tok={top_k} exceeds the {num_experts} routed experts")
    if num_experts % groups:
        raise InputError(f"{where}: {num_experts} routed experts do not split into n_group={groups} groups")
    if topk_groups > groups:
        raise InputError(f"{where}: topk_group={topk_groups} exceeds n_group={groups}")


def is_reference_config(config: dict) -> bool:
    """Whether ``config`` is in DeepSeek's reference-inference format (``dim``, ``n_routed_experts``...)."""
    return isinstance(config, dict) and "model_type" not in config and "dim" in config and (
        "n_routed_experts" in config or "moe_inter_dim" in config)


def reference_to_hf(config: dict, where: str = "config") -> dict:
    """Translate DeepSeek's reference-inference config (``inference/configs/*.json``) to transformers keys.

    The family is ``deepseek_v3`` when the config scores experts with a sigmoid, else ``deepseek_v2`` (softmax;
    DeepSeek-V2 has expert groups too: ``config_236B.json`` sets 8 groups, 3 routed to, and no score bias);
    missing ``n_expert_groups`` / ``n_limited_groups`` mean 1 and ``q_lora_rank`` 0 means no query LoRA.
    """
    r = ConfigReader(config, f"{where} (DeepSeek reference format)")
    score = r.get("score_func", "softmax")
    if score not in ("softmax", "sigmoid"):
        raise InputError(f"{r.where}: 'score_func' must be 'softmax' or 'sigmoid', got {score!r}")
    v3 = score == "sigmoid"
    q_lora = r.int("q_lora_rank", 0, minimum=0)
    return {
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "vocab_size": r.int("vocab_size"),
        "hidden_size": r.int("dim"),
        "intermediate_size": r.int("inter_dim"),
        "moe_intermediate_size": r.int("moe_inter_dim"),
        "num_hidden_layers": r.int("n_layers", maximum=MAX_LAYERS),
        "first_k_dense_replace": r.int("n_dense_layers", minimum=0, maximum=MAX_LAYERS),
        "num_attention_heads": r.int("n_heads"),
        "n_routed_experts": r.int("n_routed_experts", maximum=MAX_EXPERTS),
        "n_shared_experts": r.int("n_shared_experts", minimum=0, maximum=MAX_EXPERTS),
        "num_experts_per_tok": r.int("n_activated_experts", maximum=MAX_EXPERTS),
        "n_group": r.int("n_expert_groups", 1, maximum=MAX_EXPERTS),
        "topk_group": r.int("n_limited_groups", 1, maximum=MAX_EXPERTS),
        "q_lora_rank": q_lora or None,
        "kv_lora_rank": r.int("kv_lora_rank"),
        "qk_nope_head_dim": r.int("qk_nope_head_dim"),
        "qk_rope_head_dim": r.int("qk_rope_head_dim"),
        "v_head_dim": r.int("v_head_dim"),
        "scoring_func": score,
        "routed_scaling_factor": r.get("route_scale", 1.0),
        "tie_word_embeddings": False,
    }


def deepseek_from_reference(config: dict, where: str = "config") -> Architecture:
    """A DeepSeek architecture from the reference-inference format, with the transformers tensor names."""
    arch = deepseek_from_hf(reference_to_hf(config, where), where)
    arch.extra["source_format"] = "deepseek_reference"
    return arch
