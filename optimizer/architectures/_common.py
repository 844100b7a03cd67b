"""Shared helpers of the architecture builders: a checked config reader and a block-list builder.

Every size a config gives is bounded (:data:`~optimizer.model_spec.MAX_DIM` unless told, layer and expert
counts by their own limits), and :func:`check_layout` refuses a layer x expert count that would build more
than :data:`~optimizer.model_spec.MAX_BLOCKS` blocks before a single block is made.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

from ..errors import InputError
from ..model_spec import DEFAULT_FIXED_FORMAT, MAX_BLOCKS, MAX_DIM, MAX_MODEL_ELEMENTS, Block, BlockKind, check_shape

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
