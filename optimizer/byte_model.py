"""Exact storage bytes of an architecture's blocks in the catalog's formats.

A quantizable block costs what its format stores (see :mod:`optimizer.formats`); a non-quantizable block
(norms, routers, biases) always costs its ``fixed_format``, whatever format is asked for.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

from .errors import InputError
from .formats import get_format, resolve_format, row_length
from .model_spec import DEFAULT_FIXED_FORMAT, Architecture, Block, BlockKind


def _fixed_bytes(block: Block) -> int:
    fmt = get_format(block.fixed_format or DEFAULT_FIXED_FORMAT)
    if not fmt.admits(block.shape):
        raise InputError(f"block {block.name}: fixed format {fmt.name} cannot store shape {list(block.shape)}")
    return fmt.nbytes(block.shape)


def block_bytes(block: Block, format_name: str) -> int:
    """Exact bytes of ``block`` in ``format_name`` (its fixed format if it is not quantizable).

    Raises :class:`InputError` if the format cannot store the block's shape (no fallback here).
    """
    if not block.quantizable:
        return _fixed_bytes(block)
    fmt = get_format(format_name)
    if not fmt.admits(block.shape):
        raise InputError(f"block {block.name}: format {fmt.name} cannot store shape {list(block.shape)} "
                         f"(rows of {row_length(block.shape)} are not a multiple of {fmt.block_elements})")
    return fmt.nbytes(block.shape)


def resolved_block_bytes(block: Block, format_name: str) -> int:
    """Bytes of ``block`` when ``format_name`` is asked for, with llama.cpp's fallback for odd row lengths."""
    if not block.quantizable:
        return _fixed_bytes(block)
    return resolve_format(format_name, block.shape).nbytes(block.shape)


def _shape_groups(blocks: Sequence[Block]) -> tuple[list[tuple], np.ndarray]:
    """Unique ``(shape, quantizable, fixed_format)`` keys and each block's index into them."""
    keys: dict[tuple, int] = {}
    index = np.empty(len(blocks), dtype=np.int64)
    for i, b in enumerate(blocks):
        key = (b.shape, b.quantizable, b.fixed_format if not b.quantizable else None)
        index[i] = keys.setdefault(key, len(keys))
    return list(keys), index


def _representative(key: tuple) -> Block:
    shape, quantizable, fixed = key
    return Block("<shape>", BlockKind.ATTENTION, shape, quantizable=quantizable, fixed_format=fixed)


def bytes_table(arch: Architecture, formats: Sequence[str], fallback: bool = False) -> np.ndarray:
    """``int64 [n_blocks, n_formats]`` exact bytes of every block in every format.

    An entry is -1 where the format cannot store the block (with ``fallback=True``, llama.cpp's fallback
    format is costed instead where one fits). Non-quantizable blocks cost their fixed format in every column.
    Computed once per distinct shape, then gathered.
    """
    keys, index = _shape_groups(arch.blocks)
    cost = np.empty((len(keys), len(formats)), dtype=np.int64)
    for k, key in enumerate(keys):
        rep = _representative(key)
        for j, name in enumerate(formats):
            try:
                cost[k, j] = resolved_block_bytes(rep, name) if fallback else block_bytes(rep, name)
            except InputError:
                get_format(name)  # an unknown format name is an error, not a -1
                if not rep.quantizable:
                    raise
                cost[k, j] = -1
    return cost[index]


def uniform_bytes_by_kind(arch: Architecture, format_name: str) -> dict[BlockKind, int]:
    """Bytes per block kind with every quantizable tensor in ``format_name`` (llama.cpp fallback applied)."""
    keys, index = _shape_groups(arch.blocks)
    per_key = np.array([resolved_block_bytes(_representative(k), format_name) for k in keys], dtype=np.int64)
    totals: dict[BlockKind, int] = defaultdict(int)
    for block, i in zip(arch.blocks, index):
        totals[block.kind] += int(per_key[i])
    return dict(totals)


def uniform_bytes(arch: Architecture, format_name: str) -> int:
    """Total bytes with every quantizable tensor in ``format_name`` (llama.cpp fallback applied)."""
    keys, index = _shape_groups(arch.blocks)
    per_key = np.array([resolved_block_bytes(_representative(k), format_name) for k in keys], dtype=np.int64)
    return int(np.bincount(index, minlength=len(keys)) @ per_key)


def is_router_row_block(block: Block, experts_per_layer: dict[int, int]) -> bool:
    """Whether ``block`` has one row per routed expert of its layer (a router's weight, DeepSeek's
    score-correction bias): a plan that prunes experts keeps only the kept experts' rows.
    ``experts_per_layer``: MoE layer index -> its number of routed experts."""
    if block.kind != BlockKind.ROUTER or block.layer is None or "shared_expert_gate" in block.name:
        return False
    return (block.layer in experts_per_layer and len(block.shape) >= 1
            and block.shape[0] == experts_per_layer[block.layer])


def plan_bytes_by_kind(arch: Architecture, kept: dict[int, Sequence[int]], formats: dict[str, str]) -> dict[str, int]:
    """Exact weight bytes per block kind of a plan: ``kept`` experts per MoE layer (a layer not in ``kept``
    keeps all), ``formats`` per block name. Pruned experts cost nothing; router rows shrink to the kept experts.

    The solver's plans, ``runtime apply``'s check of a plan and the test helpers all count bytes with this.
    Raises :class:`InputError` if a kept block has no format or its format cannot store it.
    """
    kept_sets = {layer: set(int(e) for e in experts) for layer, experts in kept.items()}
    per_layer = {m.index: m.num_experts for m in arch.moe_layers}
    by_kind: dict[str, int] = {}
    for block in arch.blocks:
        if block.is_routed_expert and block.layer in kept_sets and block.expert not in kept_sets[block.layer]:
            continue
        fmt = formats.get(block.name, block.fixed_format if not block.quantizable else None)
        if fmt is None:
            raise InputError(f"plan.formats: no format for {block.name}")
        nbytes = block_bytes(block, fmt)
        if block.layer in kept_sets and is_router_row_block(block, per_layer):
            nbytes = nbytes // block.shape[0] * len(kept_sets[block.layer])
        by_kind[block.kind.value] = by_kind.get(block.kind.value, 0) + nbytes
    return by_kind
