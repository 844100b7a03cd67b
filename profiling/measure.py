"""Measured effects: prune cost of single experts, top-k cost per layer, sensitivity of single blocks.

Each is a set of :class:`~profiling.engine.Perturbation` evaluated by the engine (loss over every
calibration token, the rest of the model unchanged):

* prune cost of expert e of layer l: ``runtime.moe.mask_experts(model, {l: [e]})`` (e never routed; the
  next-best expert takes its slot and, for softmax routers, probabilities are renormalised over the rest);
* top-k cost of layer l at k: ``runtime.moe.set_top_k(model, l, k)`` (restored afterwards);
* sensitivity of block b in format f: the block alone holds ``runtime.quant.fake_quantize(W_b, f)``.

Large models get a documented, seeded sample (see :func:`sample_experts` and :func:`sample_blocks`).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import numpy as np
from torch import nn

from optimizer.formats import get_format
from optimizer.model_spec import Architecture

from .blocks import BlockRef, quantize_blocks
from .engine import Engine, Perturbation


@contextmanager
def top_k_set(model: nn.Module, layer: int, k: int):
    from runtime.moe import get_layer, set_top_k

    old = get_layer(model, layer).top_k
    set_top_k(model, layer, k)
    try:
        yield
    finally:
        set_top_k(model, layer, old)


def sample_experts(arch: Architecture, mass: Sequence[np.ndarray], per_layer: int | None,
                   rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """``(moe row, layer, expert)`` to measure: every expert when ``per_layer`` is None or covers the layer,
    else ``per_layer`` experts per layer spread over the routing-mass ranking (one random expert from each
    of ``per_layer`` equal rank strata, so both rarely and often used experts are measured)."""
    out = []
    for i, m in enumerate(arch.moe_layers):
        n = m.num_experts
        if per_layer is None or per_layer >= n:
            chosen = range(n)
        else:
            order = np.argsort(-np.asarray(mass[i]), kind="stable")
            strata = np.array_split(order, max(per_layer, 1))
            chosen = sorted(int(rng.choice(s)) for s in strata if len(s))
        out.extend((i, m.index, int(e)) for e in chosen)
    return out


def prune_costs(engine: Engine, arch: Architecture, targets: list[tuple[int, int, int]]) -> dict:
    """``{(row, expert): Effect}`` of masking each expert alone."""
    from runtime.moe import mask_experts

    model = engine.runner.model
    perts = [Perturbation((i, e), layer, lambda layer=layer, e=e: mask_experts(model, {layer: [e]}))
             for i, layer, e in targets]
    return engine.evaluate(perts, "prune cost")


def topk_costs(engine: Engine, arch: Architecture) -> dict:
    """``{(row, k): Effect}`` for k = 1..top_k-1 of every MoE layer (k = top_k is the unchanged model)."""
    model = engine.runner.model
    perts = [Perturbation((i, k), m.index, lambda layer=m.index, k=k: top_k_set(model, layer, k))
             for i, m in enumerate(arch.moe_layers) for k in range(1, m.top_k)]
    return engine.evaluate(perts, "top-k cost")


def sample_blocks(refs: Sequence[BlockRef], limit: int | None, rng: np.random.Generator) -> list[BlockRef]:
    """Blocks whose sensitivity is measured: all when ``limit`` is None or covers them; else ``limit``
    blocks drawn round-robin over the (kind, projection) groups (random order inside each group), so every
    group gets measured values for the proxy fit."""
    if limit is None or limit >= len(refs):
        return list(refs)
    groups: dict[str, list[BlockRef]] = {}
    for r in refs:
        groups.setdefault(r.group, []).append(r)
    queues = {g: [v[j] for j in rng.permutation(len(v))] for g, v in sorted(groups.items())}
    out: list[BlockRef] = []
    while len(out) < limit and any(queues.values()):
        for g in list(queues):
            if queues[g] and len(out) < limit:
                out.append(queues[g].pop(0))
    return sorted(out, key=lambda r: r.index)


def block_sensitivities(engine: Engine, refs: Sequence[BlockRef], formats: Sequence[str],
                        method: str = "rtn", cache: dict | None = None) -> dict:
    """``{(block name, format): Effect}`` of fake-quantizing each block alone in each admissible format.

    Formats that store the weight exactly (F32) are not run; their effect is 0.
    """
    model = engine.runner.model
    perts = []
    for r in refs:
        for f in formats:
            fmt = get_format(f)
            if not fmt.admits(r.block.shape) or fmt.name == "F32":
                continue
            perts.append(Perturbation((r.name, f), r.step,
                                      lambda r=r, f=f: quantize_blocks(model, [(r, f)], method, cache)))
    return engine.evaluate(perts, "block sensitivity")
