"""Where a checkpoint block lives in a transformers model in memory: the one resolver every consumer asks.

Checkpoints store one tensor per expert and projection (``...mlp.experts.{e}.{gate,up,down}_proj.weight``;
Mixtral's ``block_sparse_moe.experts.{e}.{w1,w3,w2}``). transformers 5 fuses a layer's routed experts into

    experts.gate_up_proj  [E, 2I, H]   gate = rows 0..I-1, up = rows I..2I-1
    experts.down_proj     [E, H, I]

and Mixtral's ``block_sparse_moe`` module is ``mlp`` in memory. Every other block is the parameter of the same
name. Used by apply's calibration (GPTQ), in-memory compression, loading a compressed checkpoint, and
profiling (``profiling.blocks``).
"""
from __future__ import annotations

import torch
from torch import nn

from optimizer.errors import InputError

from .moe import get_layer

#: projection -> (fused parameter, which half of its rows: 0 gate, 1 up; None: the whole expert slice)
_FUSED = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None)}


def in_memory_name(name: str) -> str:
    """The in-memory parameter name of a checkpoint tensor name (Mixtral's ``block_sparse_moe`` is ``mlp``)."""
    return name.replace(".block_sparse_moe.", ".mlp.")


def checkpoint_names(name: str) -> tuple[str, str]:
    """The checkpoint names an in-memory name may have (itself, or Mixtral's ``block_sparse_moe`` spelling)."""
    return name, name.replace(".mlp.", ".block_sparse_moe.")


def fused_param(projection: str) -> str:
    """The fused parameter of ``experts`` that holds ``projection`` (``gate_up_proj`` or ``down_proj``)."""
    if projection not in _FUSED:
        raise InputError(f"unknown expert projection {projection!r}")
    return _FUSED[projection][0]


def fused_slot(projection: str, inter: int) -> tuple[str, tuple[int, int] | None]:
    """(fused parameter of ``experts``, rows of one expert's slice holding ``projection``; None: all of it)."""
    attr, half = fused_param(projection), _FUSED[projection][1]
    return attr, (None if half is None else (half * inter, (half + 1) * inter))


def expert_view(model: nn.Module, layer: int, expert: int, projection: str) -> torch.Tensor:
    """The ``[out, in]`` view of one expert's projection inside the fused tensors (the model's current expert
    index; writes go to the model)."""
    experts = get_layer(model, layer).experts
    attr, rows = fused_slot(projection, int(experts.down_proj.shape[-1]))
    view = getattr(experts, attr)[expert]
    return view if rows is None else view[rows[0]:rows[1]]
