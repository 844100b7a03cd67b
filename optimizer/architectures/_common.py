"""Shared helpers of the architecture builders: a checked config reader, a block-list builder and the
grouped-query attention layout (:class:`GQAAttention`) that several families share.

Every size a config gives is bounded (:data:`~optimizer.model_spec.MAX_DIM` unless told, layer and expert
counts by their own limits), and :func:`check_layout` refuses a layer x expert count that would build more
than :data:`~optimizer.model_spec.MAX_BLOCKS` blocks before a single block is made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import InputError
from ..model_spec import (
    DEFAULT_FIXED_FORMAT,
    MAX_BLOCKS,
    MAX_DIM,
    MAX_MODEL_ELEMENTS,
    Block,
    BlockKind,
    KVCacheSpec,
    check_shape,
)

_MISSING = object()
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


class ConfigReader:
    """Typed access to a config dict; every failure is an :class:`InputError` naming the key."""

    def __init__(self, config: dict, where: str):
        if not isinstance(config, dict):
            raise InputError(f"{where}: config must be a JSON object, got {type(config).__name__}")
        self.config = config
        self.where = where

    def has(self, key: str) -> bool:
        return self.config.get(key) is not None

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    def int(self, key: str, default: Any = _MISSING, *, minimum: int = 1, maximum: int = MAX_DIM) -> int:
        """An integer in ``[minimum, maximum]`` (1 and :data:`MAX_DIM` unless told); ``default`` if absent or null."""
        value = self.config.get(key)
        if value is None:
            if default is _MISSING:
                raise InputError(f"{self.where}: missing key {key!r}")
            return default
        finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not finite or int(value) != value:
            raise InputError(f"{self.where}: {key!r} must be an integer, got {value!r}")
        if value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise InputError(f"{self.where}: {key!r} must be {what}, got {value!r}")
        if value > maximum:
            raise InputError(f"{self.where}: {key!r} must be <= {maximum}, got {value!r}")
        return int(value)

    def first_int(self, keys: Sequence[str], default: Any = _MISSING, *, minimum: int = 1,
                  maximum: int = MAX_DIM) -> int:
        """The first of several alias keys that is present (e.g. ``num_experts`` / ``num_local_experts``)."""
        for key in keys:
            if self.has(key):
                return self.int(key, minimum=minimum, maximum=maximum)
        if default is _MISSING:
            raise InputError(f"{self.where}: missing key {keys[0]!r} (or {', '.join(map(repr, keys[1:]))})")
        return default

    def bool(self, key: str, default: bool) -> bool:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise InputError(f"{self.where}: {key!r} must be true or false, got {value!r}")
        return value

    def int_list(self, key: str) -> list[int]:
        value = self.config.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise InputError(f"{self.where}: {key!r} must be a list of integers, got {value!r}")
        return list(value)

    def extra(self, keys: Iterable[str]) -> dict:
        """The raw values of ``keys`` that the config has (for :attr:`Architecture.extra`)."""
        return {k: self.config[k] for k in keys if k in self.config}


def check_layout(where: str, num_layers: int, num_experts: int) -> None:
    """Refuse, before building, a model whose routed-expert blocks alone would exceed :data:`MAX_BLOCKS`."""
    if num_layers * num_experts * len(MLP_PROJECTIONS) > MAX_BLOCKS:
        raise InputError(f"{where}: {num_layers} layers x {num_experts} experts x {len(MLP_PROJECTIONS)} projections "
                         f"exceed the limit of {MAX_BLOCKS} (2**21) weight blocks")


class BlockList:
    """Accumulates blocks in checkpoint order; every shape within the limits, the total too."""

    def __init__(self, where: str = "config") -> None:
        self.blocks: list[Block] = []
        self.where = where
        self.elements = 0

    def _add(self, block: Block) -> None:
        check_shape(block.shape, f"{self.where}: {block.name} shape")
        self.elements += block.numel
        if self.elements > MAX_MODEL_ELEMENTS:
            raise InputError(f"{self.where}: more than the limit of {MAX_MODEL_ELEMENTS} (2**50) elements in all")
        if len(self.blocks) >= MAX_BLOCKS:
            raise InputError(f"{self.where}: more than the limit of {MAX_BLOCKS} (2**21) weight blocks")
        self.blocks.append(block)

    def weight(self, name: str, kind: BlockKind, shape: tuple[int, ...], layer: int | None = None,
               expert: int | None = None, projection: str | None = None) -> None:
        """A quantizable tensor."""
        self._add(Block(name, kind, tuple(shape), layer, expert, projection))

    def fixed(self, name: str, kind: BlockKind, shape: tuple[int, ...], layer: int | None = None,
              projection: str | None = None) -> None:
        """A tensor kept in full precision (norms, routers, biases)."""
        self._add(Block(name, kind, tuple(shape), layer, projection=projection, quantizable=False,
                        fixed_format=DEFAULT_FIXED_FORMAT))

    def norm(self, name: str, width: int, layer: int | None = None) -> None:
        self.fixed(name, BlockKind.NORM, (width,), layer)

    def linear(self, prefix: str, kind: BlockKind, out_features: int, in_features: int, layer: int | None,
               bias: bool = False, projection: str | None = None) -> None:
        """``{prefix}.weight`` (and ``{prefix}.bias`` in full precision when ``bias``)."""
        self.weight(f"{prefix}.weight", kind, (out_features, in_features), layer, projection=projection)
        if bias:
            self.fixed(f"{prefix}.bias", kind, (out_features,), layer, projection=projection)

    def mlp(self, prefix: str, kind: BlockKind, inter: int, hidden: int, layer: int, expert: int | None = None,
            names: Sequence[str] = MLP_PROJECTIONS, bias: bool = False) -> None:
        """A gated MLP: gate and up ``[inter, hidden]``, down ``[hidden, inter]``.

        ``names`` are the checkpoint's tensor names for (gate, up, down); blocks always carry the projection
        names ``gate_proj``, ``up_proj``, ``down_proj`` (Mixtral's ``w1``, ``w3``, ``w2``).
        """
        shapes = ((inter, hidden), (inter, hidden), (hidden, inter))
        for tensor, projection, shape in zip(names, MLP_PROJECTIONS, shapes):
            self.weight(f"{prefix}.{tensor}.weight", kind, shape, layer, expert, projection)
            if bias:
                self.fixed(f"{prefix}.{tensor}.bias", kind, (shape[0],), layer, projection=projection)

    def embeddings(self, vocab: int, hidden: int) -> None:
        self.weight("model.embed_tokens.weight", BlockKind.EMBEDDING, (vocab, hidden))

    def head(self, vocab: int, hidden: int, tied: bool) -> None:
        """The final norm and, unless the embeddings are tied, ``lm_head``."""
        self.norm("model.norm.weight", hidden)
        if not tied:
            self.weight("lm_head.weight", BlockKind.LM_HEAD, (vocab, hidden))


@dataclass(frozen=True)
class GQAAttention:
    """How a family stores grouped-query attention (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``)."""

    qk_norm: str | None  # None, "head" (RMSNorm over head_dim: Qwen3, GLM-4-MoE, dots1) or "full" (over all heads)
    qk_norm_key: str | None  # config key switching the q/k norms (GLM-4-MoE's use_qk_norm), None = always
    qkv_bias_key: str | None  # config key switching q/k/v biases, None = never
    qkv_bias_default: bool
    o_bias: bool  # o_proj bias follows the same switch
    head_dim_default: int | None = None  # the family config's head_dim when absent (None: hidden / heads)
    kv_heads_default: int | None = None  # the family config's num_key_value_heads when absent (None: heads)


@dataclass(frozen=True)
class GQADims:
    """The attention sizes of a config, and the switches its :class:`GQAAttention` reads."""

    heads: int
    kv_heads: int
    head_dim: int
    qkv_bias: bool
    qk_norm: str | None

    def kv_cache(self, num_layers: int) -> KVCacheSpec:
        return KVCacheSpec("gqa", 2 * self.kv_heads * self.head_dim, num_layers)

    def extra(self) -> dict:
        """The :attr:`Architecture.extra` entries of the attention (llama.cpp's mixes read the head counts)."""
        return {"attention": "gqa", "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "head_dim": self.head_dim}


def gqa_dims(r: ConfigReader, hidden: int, layout: GQAAttention) -> GQADims:
    """Head counts and ``head_dim`` (``hidden_size / num_attention_heads`` unless given, or the family's default),
    as transformers reads them."""
    heads = r.int("num_attention_heads")
    kv_heads = r.int("num_key_value_heads", layout.kv_heads_default or heads)
    if layout.head_dim_default is not None:
        head_dim = r.int("head_dim", layout.head_dim_default)
    else:
        if not r.has("head_dim") and hidden % heads:
            raise InputError(f"{r.where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        head_dim = r.int("head_dim", hidden // heads)
    qkv_bias = r.bool(layout.qkv_bias_key, layout.qkv_bias_default) if layout.qkv_bias_key else False
    qk_norm = layout.qk_norm if layout.qk_norm_key is None or r.bool(layout.qk_norm_key, False) else None
    return GQADims(heads, kv_heads, head_dim, qkv_bias, qk_norm)


def gqa_attention(out: BlockList, prefix: str, layer: int, hidden: int, dims: GQADims, layout: GQAAttention) -> None:
    """The projections (and q/k norms) of one layer's attention module ``prefix``, in module order."""
    a, d = BlockKind.ATTENTION, dims
    out.linear(f"{prefix}.q_proj", a, d.heads * d.head_dim, hidden, layer, d.qkv_bias, "q_proj")
    out.linear(f"{prefix}.k_proj", a, d.kv_heads * d.head_dim, hidden, layer, d.qkv_bias, "k_proj")
    out.linear(f"{prefix}.v_proj", a, d.kv_heads * d.head_dim, hidden, layer, d.qkv_bias, "v_proj")
    out.linear(f"{prefix}.o_proj", a, hidden, d.heads * d.head_dim, layer, d.qkv_bias and layout.o_bias, "o_proj")
    if d.qk_norm == "head":
        out.norm(f"{prefix}.q_norm.weight", d.head_dim, layer)
        out.norm(f"{prefix}.k_norm.weight", d.head_dim, layer)
    elif d.qk_norm == "full":
        out.norm(f"{prefix}.q_norm.weight", d.heads * d.head_dim, layer)
        out.norm(f"{prefix}.k_norm.weight", d.kv_heads * d.head_dim, layer)
