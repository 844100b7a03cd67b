"""Where each profile block lives in a loaded transformers model, and quantizing blocks in place.

A profile block is a tensor of the checkpoint's per-expert layout (``optimizer.architectures``); where it lives
in memory is :mod:`runtime.layout`'s answer. :class:`BlockRef` names the parameter and the slice holding a
block, so the profiling passes can address it without looking it up again.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from optimizer.formats import get_format
from optimizer.model_spec import Architecture, Block, BlockKind
from runtime.layout import fused_slot, in_memory_name
from runtime.moe import get_layer

from .model_io import ProfilingError

EMBED_STEP = -1  # perturbation start step of the embeddings; the head's is num_layers


@dataclass(frozen=True)
class BlockRef:
    """A quantizable block: ``module.attr`` (``[expert]`` and ``rows`` for fused experts)."""

    index: int  # position in architecture.blocks
    block: Block
    module: str
    attr: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    step: int = 0  # EMBED_STEP, a decoder layer, or num_layers for lm_head / final norm

    @property
    def name(self) -> str:
        return self.block.name

    @property
    def group(self) -> str:
        """Kind and projection, the unit of the proxy-to-nats fit (e.g. ``routed_expert.down_proj``)."""
        proj = self.block.projection or self.block.name.rsplit(".", 2)[-2]
        return f"{self.block.kind.value}.{proj}" if self.block.kind != BlockKind.EMBEDDING else "embedding"

    def tensor(self, model: nn.Module) -> torch.Tensor:
        """A view of the block's weight in ``model`` (writes go to the model)."""
        t = getattr(model.get_submodule(self.module), self.attr)
        if self.expert is not None:
            t = t[self.expert]
        if self.rows is not None:
            t = t[self.rows[0]:self.rows[1]]
        return t


def resolve_blocks(arch: Architecture, model: nn.Module) -> list[BlockRef]:
    """A :class:`BlockRef` for every quantizable block of ``arch`` in ``model`` (shapes checked)."""
    refs = []
    experts_of: dict[int, tuple[str, nn.Module]] = {}
    for i, b in enumerate(arch.blocks):
        if not b.quantizable:
            continue
        step = b.layer if b.layer is not None else 0
        if b.kind == BlockKind.EMBEDDING:
            step = EMBED_STEP
        elif b.kind == BlockKind.LM_HEAD:
            step = arch.num_layers
        if b.is_routed_expert:
            if b.layer not in experts_of:
                h = get_layer(model, b.layer)
                experts_of[b.layer] = (h.name + ".experts", h.experts)
            path, experts = experts_of[b.layer]
            inter = int(experts.down_proj.shape[-1])
            attr, rows = fused_slot(b.projection, inter)
            ref = BlockRef(i, b, path, attr, b.expert, rows, step)
        else:
            ref = None
            for cand in (b.name, in_memory_name(b.name)):
                path, _, attr = cand.rpartition(".")
                try:
                    mod = model.get_submodule(path)
                except AttributeError:
                    continue
                if isinstance(getattr(mod, attr, None), torch.Tensor):
                    ref = BlockRef(i, b, path, attr, step=step)
                    break
            if ref is None:
                raise ProfilingError(f"block {b.name} of the architecture is not a tensor of the loaded model")
        shape = tuple(ref.tensor(model).shape)
        if shape != tuple(b.shape):
            raise ProfilingError(f"block {b.name}: model tensor has shape {list(shape)}, "
                                 f"architecture says {list(b.shape)}")
        refs.append(ref)
    return refs


def quantized_copy(weight: torch.Tensor, fmt: str, method: str = "rtn") -> torch.Tensor:
    """``fake_quantize`` of a block (runtime.quant, quantize then dequantize along rows)."""
    from runtime.quant import fake_quantize

    return fake_quantize(weight.detach(), fmt, method)


@contextmanager
def quantize_blocks(model: nn.Module, items: Iterable[tuple[BlockRef, str]], method: str = "rtn",
                    cache: dict | None = None) -> Iterator[None]:
    """Within the block, each ``(ref, format)`` block of ``model`` holds its fake-quantized weight.

    ``cache`` (optional) maps ``(block name, format)`` to an already quantized tensor, so that repeated
    measurements of the same cell do not re-quantize.
    """
    saved = []
    try:
        with torch.no_grad():
            for ref, fmt in items:
                if not get_format(fmt).quantized and get_format(fmt).name == "F32":
                    continue
                view = ref.tensor(model)
                key = (ref.name, fmt)
                q = cache.get(key) if cache is not None else None
                if q is None:
                    q = quantized_copy(view, fmt, method)
                    if cache is not None:
                        cache[key] = q
                saved.append((view, view.clone()))
                view.copy_(q)
        yield
    finally:
        with torch.no_grad():
            for view, original in reversed(saved):
                view.copy_(original)


def admissible(refs: Sequence[BlockRef], formats: Sequence[str]) -> dict[str, list[str]]:
    """Formats (of ``formats``) that can store each block, by block name."""
    return {r.name: [f for f in formats if get_format(f).admits(r.block.shape)] for r in refs}
