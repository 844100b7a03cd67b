"""DeepSeek-V3 routing under grouped-query attention: ``glm4_moe`` (GLM-4.5 / 4.6), ``dots1`` (dots.llm1) and
``solar_open`` (Solar Open).

Both route like DeepSeek-V3 (sigmoid scores, ``e_score_correction_bias``, group-limited top-k,
``routed_scaling_factor``), with ``shared_experts`` and ``first_k_dense_replace`` leading dense layers: the MoE
side is :func:`~optimizer.architectures.deepseek.deepseek_layers`. Attention is the standard
``q_proj``/``k_proj``/``v_proj``/``o_proj`` (:func:`~optimizer.architectures._common.gqa_attention`):

* GLM-4-MoE: q/k/v biases with ``attention_bias`` (``o_proj`` never), per-head q/k norms with ``use_qk_norm``;
  partial rotary embeddings change no weight. Its multi-token-prediction layer (``num_nextn_predict_layers``,
  stored after the last layer) is not part of the model transformers builds and is left out, as DeepSeek-V3's.
* dots1: all four projections biased with ``attention_bias``, per-head q/k norms always.
* Solar Open: GLM-4-MoE's attention without q/k norms, and an MoE block in every layer (no
  ``first_k_dense_replace``, no ``intermediate_size``); ``head_dim`` 128 and 8 key/value heads when absent, as
  its transformers config defaults them.
"""

from __future__ import annotations

from ..errors import InputError
from ..model_spec import MAX_LAYERS, Architecture
from ._common import BlockList, ConfigReader, GQAAttention, gqa_attention, gqa_dims
from .deepseek import MOE_EXTRA_KEYS, deepseek_layers, read_deepseek_moe

#: family -> (attention layout, transformers' default first_k_dense_replace (None: every layer routes, the key
#: is not read), default n_shared_experts or None)
LAYOUTS: dict[str, tuple[GQAAttention, int | None, int | None]] = {
    "glm4_moe": (GQAAttention("head", "use_qk_norm", "attention_bias", False, False), 1, 1),
    "dots1": (GQAAttention("head", None, "attention_bias", False, True), 0, None),
    "solar_open": (GQAAttention(None, None, "attention_bias", False, False, head_dim_default=128,
                                kv_heads_default=8), None, 1),
}
DEEPSEEK_GQA_FAMILIES = tuple(LAYOUTS)
_EXTRA_KEYS = MOE_EXTRA_KEYS + ("attention_bias", "use_qk_norm", "sliding_window", "max_window_layers")


def deepseek_gqa_from_hf(config: dict, where: str = "config") -> Architecture:
    """An architecture of one of :data:`DEEPSEEK_GQA_FAMILIES` from a transformers ``config.json`` dict."""
    family = config.get("model_type")
    if family not in LAYOUTS:
        raise InputError(f"{where}: model_type must be one of {DEEPSEEK_GQA_FAMILIES}, got {family!r}")
    attention, first_dense, shared = LAYOUTS[family]
    r = ConfigReader(config, f"{where} ({family})")
    hidden, vocab = r.int("hidden_size"), r.int("vocab_size")
    num_layers = r.int("num_hidden_layers", maximum=MAX_LAYERS)
    dims = gqa_dims(r, hidden, attention)
    moe = read_deepseek_moe(r, num_layers, score_bias=True, first_dense_default=first_dense or 0,
                            shared_default=shared, dense="none" if first_dense is None else "first_k")
    tied = r.bool("tie_word_embeddings", False)

    out = BlockList(r.where)
    out.embeddings(vocab, hidden)
    moe_layers = deepseek_layers(out, moe, num_layers, hidden,
                                 lambda prefix, layer: gqa_attention(out, prefix, layer, hidden, dims, attention))
    out.head(vocab, hidden, tied)

    extra = r.extra(_EXTRA_KEYS)
    extra.update(dims.extra(), score_func="sigmoid")
    return Architecture(
        family=family, num_layers=num_layers, hidden_size=hidden, vocab_size=vocab, moe_layers=moe_layers,
        shared_experts=moe.shared, blocks=tuple(out.blocks), kv_cache=dims.kv_cache(num_layers),
        expert_groups=moe.groups, topk_groups=moe.topk_groups, extra=extra,
    )
