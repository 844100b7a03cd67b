"""A fast plan and a proven bound for ``--target llamacpp`` (tied formats, one expert count, one k).

Bound: the llama.cpp problem is the ``hf`` problem plus tying constraints, so the ``hf`` Lagrangian bound
(:mod:`.decomposition`) is a valid lower bound for it.

Plan: for every expert count N (a multiple of the number of groups) the best global k is fixed by the
top-k costs alone. With the byte row priced at lam, each layer then chooses one format per projection and
N experts (N/G per group) by alternating two exact steps, each of which cannot increase the layer's
priced cost:

    formats | experts:  f_p = argmin_f  sum_{e kept} sens[e,p,f] + lam N bytes[p,f]
    experts | formats:  per group, the N/G smallest  sum_p sens[e,p,f_p] + lam (bytes + router) - drop_e

Bisection on lam finds the cheapest plan that fits; the best N wins; spare bytes go to non-expert blocks.
This is a heuristic (no optimality claim of its own); the gap to the hf bound is what the plan reports.

It takes seconds per expert count at DeepSeek-V3 scale, so it looks at the clock: given a ``deadline`` (a
``time.perf_counter()`` instant) it stops there and returns the best plan found so far (the cheapest plan
that fitted for any N, including the one being bisected), or ``None`` if none fitted yet.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .decisions import Decisions
from .decomposition import spend_leftover
from .instance import Instance


class _Tied:
    def __init__(self, inst: Instance):
        arch = inst.profile.architecture
        self.inst = inst
        projections = list(arch.expert_projections)
        P, F = len(projections), len(inst.formats)
        self.P, self.F = P, F
        n_layers = len(inst.layer_top_k)
        self.sens = np.full((inst.num_experts, P, F), np.inf)
        self.bytes = np.full((n_layers, P, F), 1e30)  # finite, so 0 * unavailable stays 0 (sens is inf there)
        self.pair_of = np.full((inst.num_experts, P, F), -1, dtype=np.int64)
        proj = np.array([projections.index(b.projection) if b.is_routed_expert else -1 for b in arch.blocks])
        ep = np.flatnonzero(inst.block_owner[inst.pair_block] >= 0)
        e = inst.block_owner[inst.pair_block[ep]]
        p = proj[inst.pair_block[ep]]
        f = inst.pair_format[ep]
        self.sens[e, p, f] = inst.pair_cost[ep]
        self.bytes[inst.expert_layer[e], p, f] = inst.pair_bytes[ep]
        self.pair_of[e, p, f] = ep
        self.nonexpert = inst.block_quantizable & (inst.block_owner < 0)
        self.cap = inst.capacity

    def layer_plan(self, i: int, n_per_group: int, lam: float,
                   n_total: int) -> tuple[float, np.ndarray, np.ndarray, float]:
        """(priced cost, kept expert ids, format per projection, bytes) of layer i for N experts."""
        inst = self.inst
        ids = (inst.layer_first_expert[i] + np.arange(inst.layer_experts[i])).reshape(inst.groups, -1)
        flat = ids.ravel()
        sens = self.sens[flat]  # [E, P, F]
        nbytes = self.bytes[i]  # [P, F]
        own_best = np.min(sens + lam * nbytes[None], axis=2).sum(axis=1)
        delta = own_best + lam * inst.router_bytes[flat] - inst.drop_cost[flat]
        kept = self._select(ids, delta.reshape(ids.shape), n_per_group)
        fmt = np.zeros(self.P, dtype=int)
        for _ in range(4):
            fmt_new = np.argmin(sens[np.isin(flat, kept)].sum(axis=0) + lam * n_total * nbytes, axis=1)
            per = (sens[:, np.arange(self.P), fmt_new].sum(axis=1)
                   + lam * (nbytes[np.arange(self.P), fmt_new].sum() + inst.router_bytes[flat])
                   - inst.drop_cost[flat])
            kept_new = self._select(ids, per.reshape(ids.shape), n_per_group)
            if np.array_equal(fmt_new, fmt) and np.array_equal(np.sort(kept_new), np.sort(kept)):
                break
            fmt, kept = fmt_new, kept_new
        chosen_bytes = float(n_total * nbytes[np.arange(self.P), fmt].sum() + inst.router_bytes[kept].sum())
        cost = float(self.sens[kept][:, np.arange(self.P), fmt].sum() + inst.drop_cost[flat].sum()
                     - inst.drop_cost[kept].sum())
        return cost + lam * chosen_bytes, kept, fmt, chosen_bytes

    @staticmethod
    def _select(ids: np.ndarray, delta: np.ndarray, m: int) -> np.ndarray:
        order = np.argsort(delta, axis=1, kind="stable")[:, :m]
        return np.take_along_axis(ids, order, 1).ravel()

    def plan(self, n_per_group: int, k: int, lam: float) -> tuple[Decisions, int]:
        inst = self.inst
        n_total = n_per_group * inst.groups
        keep = np.zeros(inst.num_experts, dtype=bool)
        chosen = np.zeros(len(inst.pair_block), dtype=bool)
        total = 0.0
        for i in range(len(inst.layer_top_k)):
            _, kept, fmt, nbytes = self.layer_plan(i, n_per_group, lam, n_total)
            keep[kept] = True
            chosen[self.pair_of[kept][:, np.arange(self.P), fmt].ravel()] = True
            total += nbytes
        # non-expert blocks: their own best format at this price
        pv = inst.pair_cost + lam * inst.pair_bytes
        for b in np.flatnonzero(self.nonexpert):
            s = inst.pairs_of(int(b))
            chosen[s.start + int(np.argmin(pv[s]))] = True
        top_k = np.full(len(inst.layer_top_k), k)
        d = Decisions(keep, top_k, chosen)
        return d, int(inst.pair_bytes[chosen].sum() + inst.router_bytes[keep].sum())


def llamacpp_plan(inst: Instance, max_evaluations: int = 24, deadline: float | None = None) -> Decisions | None:
    """Best tied plan over expert counts N (see the module docstring); None if no N fits (or none did by
    ``deadline``, a ``time.perf_counter()`` instant past which the search stops)."""
    tied = _Tied(inst)
    G, TG, kmin = inst.groups, inst.topk_groups, inst.min_top_k
    per_group = int(inst.layer_experts.min()) // G
    K = int(inst.layer_top_k[0])
    topk_total = sum(inst.topk_cost)
    lo = max(math.ceil(int(inst.layer_min_experts.max()) / G), min(2, per_group) if G > 1 else 1)
    best: tuple[float, Decisions] | None = None
    for m in range(lo, per_group + 1):
        kmax = min(K, TG * m, G * m)
        if kmax < kmin:
            continue
        if _late(deadline):
            break
        k = kmin + int(np.argmin(topk_total[kmin - 1:kmax]))
        found = _fitting_plan(inst, tied, m, k, max_evaluations, deadline)
        if found is None:
            continue
        nbytes = int(inst.pair_bytes[found.chosen].sum() + inst.router_bytes[found.keep].sum())
        upgraded, _ = spend_leftover(inst, found, nbytes, tied.cap, movable=tied.nonexpert)
        obj = upgraded.objective(inst)
        if best is None or obj < best[0]:
            best = (obj, upgraded)
    return None if best is None else best[1]


def _late(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() >= deadline


def _fitting_plan(inst: Instance, tied: _Tied, m: int, k: int, max_evaluations: int,
                  deadline: float | None) -> Decisions | None:
    """The cheapest plan with m experts per group and top-k k that fits, by bisection on the byte price."""
    d, nbytes = tied.plan(m, k, 0.0)
    if nbytes <= tied.cap:
        return d
    lam_lo, lam_hi, found = 0.0, None, None
    scale = max(float(np.abs(inst.pair_cost).sum() + inst.drop_cost.sum()), 1e-12) / max(float(tied.cap), 1.0)
    lam = scale
    for _ in range(40):
        if _late(deadline):
            return None
        d, nbytes = tied.plan(m, k, lam)
        if nbytes <= tied.cap:
            lam_hi, found = lam, d
            break
        lam_lo, lam = lam, lam * 8
    for _ in range(max_evaluations if lam_hi is not None else 0):
        if _late(deadline):
            break
        lam = math.sqrt(lam_lo * lam_hi) if lam_lo > 0 else lam_hi / 8
        d, nbytes = tied.plan(m, k, lam)
        if nbytes <= tied.cap:
            lam_hi, found = lam, d
        else:
            lam_lo = lam
        if lam_hi - lam_lo <= 1e-3 * lam_hi:
            break
    return found


__all__ = ["llamacpp_plan"]
