"""llama.cpp's own quantization mixes (``llama-quantize ... Q4_K_M``) as per-block GGUF types and bytes.

Users compare a compression plan against the standard mixes that ``llama-quantize`` writes, not against one
type everywhere. :func:`mix_types` gives the GGUF type every quantizable block of an
:class:`~optimizer.model_spec.Architecture` gets under one of :data:`MIXES`; :func:`mix_bytes` is the
mix's total weight bytes, counted by :func:`optimizer.byte_model.plan_bytes_by_kind` (the one definition of
bytes).

The rules follow ``llama_tensor_get_type`` / ``llama_tensor_get_type_impl`` and ``tensor_type_fallback`` in
mainline llama.cpp's ``src/llama-quant.cpp`` (ggml-org/llama.cpp, stored at commit
007dbbf3fd17eefe9b47fee45f48f7ba5e62b714), without an importance matrix and without ``--pure``, overrides or
``--output-tensor-type`` / ``--token-embedding-type``. In short, with ``use_more_bits(i, n)`` = ``i < n/8 or
i >= 7n/8 or (i - n/8) % 3 == 2`` (integer division):

* ``output.weight`` (and ``token_embd`` when the embeddings are tied): Q8_0 if its rows do not divide into the
  mix's default type, else Q5_K for the IQ mixes, else Q6_K.
* ``token_embd``: Q2_K for IQ2_XXS / IQ1_S / IQ1_M, else the default type.
* attn_v-like tensors (``attn_v``, ``attn_qkv`` and DeepSeek's ``attn_kv_b``), counted in file order:
  Q4_K_M: Q6_K where ``use_more_bits``; Q3_K_M: Q5_K for the first two, Q4_K after; Q2_K: Q4_K if n_gqa >= 4
  else Q3_K; the IQ mixes: Q4_K if n_gqa >= 4 or the model has >= 4 experts, else Q2_K; 8-expert models
  (Mixtral) take Q8_0 outside the IQ mixes.
* ``ffn_down`` (dense, ``_exps`` and ``_shexp``): Q4_K_M: Q6_K in ``use_more_bits`` layers; Q3_K_M: Q5_K in
  layers < n/16, Q4_K after; Q2_K: Q3_K; the IQ mixes: Q2_K for the first n/8 ffn_down *tensors* in file
  order (a counter, so an MoE layer's ``_exps`` and ``_shexp`` count twice), else the default.
* ``attn_output``: Q2_K -> Q3_K, Q3_K_M -> Q4_K, IQ1_S / IQ1_M -> IQ2_XXS; Q5_K for 8-expert models.
* ``attn_k`` of 8-expert models: Q8_0 (Q4_K in the IQ mixes). Everything else (``ffn_gate``, ``ffn_up``,
  ``attn_q``, DeepSeek's ``attn_q_a`` / ``attn_q_b`` / ``attn_kv_a_mqa``) takes the default type.
* Last, a type whose blocks do not divide a row falls back as :func:`optimizer.formats.resolve_format` does
  (Q6_K -> Q8_0, Q4_K -> Q5_0, IQ* -> IQ4_NL, ...), and to F16 if the fallback does not divide it either.

A mix gives all of a layer's routed experts one type (GGUF stores them as one ``ffn_*_exps`` tensor).
Differences from a real file, all small: a model's MTP layers (moecc's architectures leave them out, and so
did the converted files of the time) and the LLM_TYPE_70B / Falcon special cases are not modelled; DeepSeek's
``kv_b_proj`` is costed as one fused ``attn_kv_b`` tensor (what moecc stores), whereas converters since
llama.cpp's MLA change (April 2025) split it into ``attn_k_b`` (rows of 128, so it falls back) and
``attn_v_b``; llama.cpp's n_gqa for DeepSeek is taken as 1 (128 KV heads, the fused layout's value).
"""

from __future__ import annotations

from enum import Enum

from .byte_model import plan_bytes_by_kind
from .errors import InputError
from .formats import LLAMACPP_FALLBACK, get_format, resolve_format, row_length
from .model_spec import Architecture, Block, BlockKind

#: The mixes modelled, by llama-quantize's name.
MIXES: tuple[str, ...] = ("Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_XXS", "IQ1_M", "IQ1_S")
#: Each mix's default tensor type (``llama_ftype_get_default_type``).
DEFAULT_TYPE: dict[str, str] = {
    "Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K", "Q2_K": "Q2_K", "IQ2_XXS": "IQ2_XXS", "IQ1_M": "IQ1_M", "IQ1_S": "IQ1_S",
}
_IQ_MIXES = frozenset({"IQ2_XXS", "IQ1_M", "IQ1_S"})


class Role(str, Enum):
    """llama.cpp's tensor category (``tensor_get_category``) of a block."""

    TOKEN_EMBD = "token_embd"
    OUTPUT = "output"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_KV_B = "attn_kv_b"
    ATTN_OUTPUT = "attn_output"
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


_ATTENTION_ROLES = {"q_proj": Role.ATTN_Q, "k_proj": Role.ATTN_K, "v_proj": Role.ATTN_V,
                    "kv_b_proj": Role.ATTN_KV_B, "o_proj": Role.ATTN_OUTPUT}
_FFN_ROLES = {"gate_proj": Role.FFN_GATE, "up_proj": Role.FFN_UP, "down_proj": Role.FFN_DOWN}
_FFN_KINDS = (BlockKind.DENSE_MLP, BlockKind.ROUTED_EXPERT, BlockKind.SHARED_EXPERT)
# within a layer GGUF names sort ffn_down < ffn_down_exps < ffn_down_shexp (llama.cpp iterates in that order)
_KIND_ORDER = {BlockKind.DENSE_MLP: 0, BlockKind.ROUTED_EXPERT: 1, BlockKind.SHARED_EXPERT: 2}
_ATTN_V_LIKE = (Role.ATTN_V, Role.ATTN_KV_B)


def tensor_role(block: Block) -> Role:
    """The llama.cpp category of a moecc block, from its kind and projection (HF names, not GGUF names)."""
    if block.kind == BlockKind.EMBEDDING:
        return Role.TOKEN_EMBD
    if block.kind == BlockKind.LM_HEAD:
        return Role.OUTPUT
    if block.kind == BlockKind.ATTENTION:
        return _ATTENTION_ROLES.get(block.projection or "", Role.OTHER)
    if block.kind in _FFN_KINDS:
        return _FFN_ROLES.get(block.projection or "", Role.OTHER)
    return Role.OTHER


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth and every third between."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or (i_layer - eighth) % 3 == 2


def check_mix(mix: str) -> str:
    """The canonical mix name; raises :class:`InputError` for one not modelled."""
    key = str(mix).upper() if isinstance(mix, str) else mix
    if key not in MIXES:
        raise InputError(f"unknown llama.cpp mix {mix!r}; known: {', '.join(MIXES)}")
    return key


def _n_expert(arch: Architecture) -> int:
    return max((m.num_experts for m in arch.moe_layers), default=0)


def _n_gqa(arch: Architecture) -> int:
    """Query heads per KV head as llama.cpp's hparams see them (1 for MLA's fused layout, 1 if unknown)."""
    if arch.kv_cache.kind == "mla":
        return 1
    heads = arch.extra.get("num_attention_heads")
    kv_heads = arch.extra.get("num_key_value_heads") or heads
    return int(heads) // int(kv_heads) if heads and kv_heads else 1


def _gguf_tensor(block: Block, role: Role) -> tuple:
    """One key per GGUF tensor: every routed expert of a layer and projection shares one ``_exps`` tensor."""
    layer = -1 if block.layer is None else block.layer
    if block.is_routed_expert:
        return (layer, _KIND_ORDER[block.kind], role.value)
    return (layer, _KIND_ORDER.get(block.kind, 3), role.value, block.name)


def _fallback(type_name: str, shape: tuple[int, ...]) -> str:
    """``tensor_type_fallback``: the type itself if it divides the rows, else its fallback, else F16."""
    try:
        return resolve_format(type_name, shape).name
    except InputError:
        if type_name in LLAMACPP_FALLBACK:
            return "F16"
        raise


class _Rules:
    """``llama_tensor_get_type_impl`` for one mix and one architecture."""

    def __init__(self, arch: Architecture, mix: str) -> None:
        self.mix = mix
        self.default = DEFAULT_TYPE[mix]
        self.iq = mix in _IQ_MIXES
        self.n_layers = arch.num_layers
        self.n_expert = _n_expert(arch)
        self.n_gqa = _n_gqa(arch)
        self.tied = arch.tied_head
        # file-order counters of attn_v-like and ffn_down tensors
        keys = {_gguf_tensor(b, tensor_role(b)) for b in arch.blocks if b.quantizable}
        self.attn_v_index = {k: i for i, k in enumerate(sorted(k for k in keys if Role(k[2]) in _ATTN_V_LIKE))}
        self.ffn_down_index = {k: i for i, k in enumerate(sorted(k for k in keys if k[2] == Role.FFN_DOWN.value))}

    def type_of(self, block: Block, role: Role, key: tuple) -> str:
        t = self.default
        if role == Role.OUTPUT or (self.tied and role == Role.TOKEN_EMBD):
            if row_length(block.shape) % get_format(t).block_elements:
                return "Q8_0"
            return "Q5_K" if self.iq else ("Q6_K" if t != "Q8_0" else t)
        if role == Role.TOKEN_EMBD:
            return "Q2_K" if self.iq else t
        if self.iq:
            return self._iq_type(role, key)
        if role in _ATTN_V_LIKE:
            i, n = self.attn_v_index[key], len(self.attn_v_index)
            if self.mix == "Q2_K":
                t = "Q4_K" if self.n_gqa >= 4 else "Q3_K"
            elif self.mix == "Q3_K_M":
                t = "Q5_K" if i < 2 else "Q4_K"
            elif self.mix == "Q4_K_M" and use_more_bits(i, n):
                t = "Q6_K"
            return "Q8_0" if self.n_expert == 8 else t
        if role == Role.ATTN_K:
            return "Q8_0" if self.n_expert == 8 else t
        if role == Role.FFN_DOWN:
            # MoE models: the layer parsed from the name; dense ones: the ffn_down counter
            i = block.layer if self.n_expert > 1 and block.layer is not None else self.ffn_down_index[key]
            n = self.n_layers
            if self.mix == "Q2_K":
                return "Q3_K"
            if self.mix == "Q3_K_M":
                return "Q5_K" if i < n // 16 else "Q4_K"
            return "Q6_K" if use_more_bits(i, n) else t  # Q4_K_M
        if role == Role.ATTN_OUTPUT:
            if self.n_expert == 8:
                return "Q5_K"
            return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K"}.get(self.mix, t)
        return t

    def _iq_type(self, role: Role, key: tuple) -> str:
        t = self.default
        if role in _ATTN_V_LIKE:
            return "Q4_K" if self.n_gqa >= 4 or self.n_expert >= 4 else "Q2_K"
        if role == Role.ATTN_K and self.n_expert == 8:
            return "Q4_K"
        if role == Role.FFN_DOWN:
            return "Q2_K" if self.ffn_down_index[key] < self.n_layers // 8 else t
        if role == Role.ATTN_OUTPUT:
            if self.n_expert == 8:
                return "Q5_K"
            return "IQ2_XXS" if self.mix in ("IQ1_S", "IQ1_M") else t
        return t


def mix_types(arch: Architecture, mix: str) -> dict[str, str]:
    """GGUF type of every quantizable block under llama.cpp's ``mix`` (fallback for odd rows applied).

    A quantizable block of fewer than two dimensions is not quantized by llama.cpp and gets F32.
    """
    mix = check_mix(mix)
    rules = _Rules(arch, mix)
    out: dict[str, str] = {}
    memo: dict[tuple, str] = {}
    for block in arch.blocks:
        if not block.quantizable:
            continue
        if len(block.shape) < 2:
            out[block.name] = "F32"
            continue
        role = tensor_role(block)
        key = _gguf_tensor(block, role)
        memo_key = (key[:3] if block.is_routed_expert else key, block.shape)
        if memo_key not in memo:
            memo[memo_key] = _fallback(rules.type_of(block, role, key), block.shape)
        out[block.name] = memo[memo_key]
    return out


def mix_bytes_by_kind(arch: Architecture, mix: str) -> dict[str, int]:
    """Weight bytes per block kind under ``mix``, nothing pruned (fixed tensors at their fixed format)."""
    return plan_bytes_by_kind(arch, {}, mix_types(arch, mix))


def mix_bytes(arch: Architecture, mix: str) -> int:
    """Total weight bytes of ``arch`` under llama.cpp's ``mix`` (what the GGUF's tensor data takes)."""
    return sum(mix_bytes_by_kind(arch, mix).values())
