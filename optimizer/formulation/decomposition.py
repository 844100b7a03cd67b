"""Lagrangian decomposition of the joint ILP: a proven lower bound and a near-optimal plan in milliseconds.

Dualising only the byte row (1) with a multiplier lam >= 0 gives

    L(lam) = min_x  J(x) + lam (bytes(x) - cap)     over x satisfying every other constraint,

a lower bound on the optimum for every lam (weak duality). Without the byte row the problem splits:

* a block not owned by an expert takes argmin_f  sens[b,f] + lam bytes[b,f];
* expert e of layer i costs  delta_e = sum_{its blocks} min_f(sens + lam bytes) + lam router_bytes - drop_e
  if kept (relative to dropping it);
* layer i chooses m experts per group (m in [m_lo, E_i/G]) and k in [k_min, min(K_i, TG m, G m)]: for
  each m the best experts are the m smallest delta of every group, and the best k is a prefix minimum of
  the top-k costs, so the layer is solved exactly by enumerating m (a prune curve's count term
  g_i(E_i - G m) is a constant of m, added to its value).

``L`` is concave in lam; bisection on the sign of its subgradient bytes(x(lam)) - cap finds the crossing.
The solution at the feasible end is a plan satisfying every constraint; spare bytes are then spent by
greedy upgrades (best cost decrease per byte first). Its objective minus the best ``L`` is a certified gap.
Valid for ``--target hf`` without a speed constraint (other cases return ``None`` and go to the MILP).

Given a ``deadline`` (a ``time.perf_counter()`` instant) the bisection stops when it passes and returns the
best plan and bound found so far (``stopped``); if it passes before any multiplier gave a plan that fits,
the smallest plan (every block at its fewest bytes, spare bytes spent) is returned instead.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from ..plan import Target
from .decisions import Decisions
from .instance import Instance


@dataclass(frozen=True, eq=False)
class LagrangianResult:
    decisions: Decisions  # feasible plan
    objective: float
    bound: float  # max_lam L(lam): proven lower bound on the optimum
    multiplier: float
    evaluations: int
    seconds: float
    stopped: bool = False  # the deadline ended the bisection early (the plan and bound are still valid)

    @property
    def gap(self) -> float:
        return max(0.0, (self.objective - self.bound) / max(abs(self.objective), 1e-12))


def applicable(inst: Instance) -> bool:
    return inst.options.target == Target.HF and inst.options.min_tokens_per_s is None


def segment_minima(pv: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per segment of consecutive entries of ``pv`` (segment s is ``starts[s]:starts[s+1]``, the last runs to the
    end; e.g. the pairs of each quantizable block), the least value and the first entry that attains it."""
    minv = np.minimum.reduceat(pv, starts)
    hit = np.flatnonzero(pv <= np.repeat(minv, np.diff(np.append(starts, len(pv)))))
    segment = np.searchsorted(starts, hit, side="right") - 1
    first = np.ones(len(hit), dtype=bool)
    first[1:] = segment[1:] != segment[:-1]
    return minv, hit[first]


class _Relaxation:
    """Evaluates the relaxed problem for a multiplier; arrays are precomputed once."""

    def __init__(self, inst: Instance):
        self.inst = inst
        q = np.flatnonzero(inst.block_quantizable)
        self.q_blocks = q
        self.starts = inst.pair_ptr[q]
        owner = inst.block_owner[q]
        self.owner = owner
        self.expert_mask = owner >= 0
        self.cap = inst.capacity
        # per layer: expert ids grouped [G, per_group]
        self.layers = []
        for i in range(len(inst.layer_top_k)):
            E, G = int(inst.layer_experts[i]), inst.groups
            ids = inst.layer_first_expert[i] + np.arange(E)
            per_group = E // G
            m_lo = max(math.ceil(int(inst.layer_min_experts[i]) / G), min(2, per_group) if G > 1 else 0)
            ms = np.arange(m_lo, per_group + 1)
            kmax = np.minimum(np.minimum(int(inst.layer_top_k[i]), inst.topk_groups * ms), G * ms)
            ms = ms[kmax >= inst.min_top_k]
            kmax = kmax[kmax >= inst.min_top_k]
            t = inst.topk_cost[i][inst.min_top_k - 1:]
            best_t = np.minimum.accumulate(t)  # best cost for k <= kmin + j
            best_k = np.array([inst.min_top_k + int(np.argmin(t[: j + 1])) for j in range(len(t))])
            count = np.zeros(len(ms)) if inst.prune_count_cost is None else inst.prune_count_cost[i][E - G * ms]
            self.layers.append((ids.reshape(G, per_group), ms, best_t[kmax - inst.min_top_k] + count,
                                best_k[kmax - inst.min_top_k]))

    def solve(self, lam: float, cost_weight: float = 1.0) -> tuple[float, Decisions, int]:
        """Minimise the relaxed objective; return (L(lam), decisions, bytes)."""
        inst = self.inst
        pv = cost_weight * inst.pair_cost + lam * inst.pair_bytes
        minv, best_pair = segment_minima(pv, self.starts)
        keep_value = np.bincount(self.owner[self.expert_mask], weights=minv[self.expert_mask],
                                 minlength=inst.num_experts)
        delta = keep_value + lam * inst.router_bytes - cost_weight * inst.drop_cost
        keep = np.zeros(inst.num_experts, dtype=bool)
        top_k = np.zeros(len(self.layers), dtype=int)
        total = float(minv[~self.expert_mask].sum()) + cost_weight * float(inst.drop_cost.sum())
        for i, (ids, ms, best_t, best_k) in enumerate(self.layers):
            d = delta[ids]
            order = np.argsort(d, axis=1, kind="stable")
            prefix = np.concatenate([np.zeros((d.shape[0], 1)), np.cumsum(np.take_along_axis(d, order, 1), axis=1)],
                                    axis=1)
            values = prefix[:, ms].sum(axis=0) + cost_weight * best_t
            j = int(np.argmin(values))
            total += float(values[j])
            m = int(ms[j])
            keep[np.take_along_axis(ids, order[:, :m], 1).ravel()] = True
            top_k[i] = int(best_k[j])
        chosen = np.zeros(len(pv), dtype=bool)
        present = ~self.expert_mask | keep[np.maximum(self.owner, 0)]
        chosen[best_pair[present]] = True
        nbytes = int(inst.pair_bytes[chosen].sum() + inst.router_bytes[keep].sum())
        return total - lam * self.cap, Decisions(keep, top_k, chosen), nbytes


def min_weight_bytes(inst: Instance) -> int:
    """Fewest bytes any plan satisfying the structural constraints can have (fixed tensors included)."""
    relax = _Relaxation(inst)
    _, d, nbytes = relax.solve(1.0, cost_weight=0.0)
    if inst.options.target == Target.LLAMACPP:
        # every layer must keep as many experts as the most demanding one, each at its smallest size
        per_layer = np.bincount(inst.expert_layer[d.keep], minlength=len(inst.layer_top_k))
        n = int(per_layer.max())
        extra = 0
        for i, kept in enumerate(per_layer):
            ids = inst.layer_first_expert[i] + np.arange(inst.layer_experts[i])
            sizes = _expert_min_bytes(inst)[ids]
            extra += int(np.sort(sizes)[:n].sum()) - int(sizes[d.keep[ids]].sum())
        nbytes += extra
    return nbytes + inst.fixed_bytes


def _expert_min_bytes(inst: Instance) -> np.ndarray:
    q = np.flatnonzero(inst.block_quantizable)
    minb = np.minimum.reduceat(inst.pair_bytes, inst.pair_ptr[q])
    owner = inst.block_owner[q]
    m = owner >= 0
    return np.bincount(owner[m], weights=minb[m], minlength=inst.num_experts).astype(np.int64) + inst.router_bytes


def spend_leftover(inst: Instance, d: Decisions, nbytes: int, cap: int,
                   movable: np.ndarray | None = None) -> tuple[Decisions, int]:
    """Spend spare bytes on format upgrades of present blocks (only ``movable`` ones, if given): each
    block's best cost decrease per extra byte is a candidate; candidates are applied best ratio first while
    they fit."""
    chosen = d.chosen.copy()
    cur = np.full(len(inst.block_owner), -1)
    cur[inst.pair_block[chosen]] = np.flatnonzero(chosen)
    left = cap - nbytes
    cp = cur[inst.pair_block]
    cand = np.flatnonzero((cp >= 0) & ~chosen & (True if movable is None else movable[inst.pair_block]))
    dc = inst.pair_cost[cp[cand]] - inst.pair_cost[cand]
    db = inst.pair_bytes[cand] - inst.pair_bytes[cp[cand]]
    ok = (dc > 0) & (db <= left)
    cand, dc, db = cand[ok], dc[ok], db[ok]
    if not len(cand):
        return d, nbytes
    ratio = np.where(db > 0, dc / np.maximum(db, 1), np.inf)
    blocks = inst.pair_block[cand]
    order = np.lexsort((-dc, -ratio, blocks))  # per block: best ratio first
    first = np.ones(len(order), dtype=bool)
    first[1:] = blocks[order][1:] != blocks[order][:-1]
    best = order[first]
    best = best[np.lexsort((-dc[best], -ratio[best]))]
    for j in best.tolist():
        if db[j] <= left:
            p = int(cand[j])
            chosen[cp[p]] = False
            chosen[p] = True
            left -= int(db[j])
    return Decisions(d.keep, d.top_k, chosen), cap - left


def lagrangian(inst: Instance, rel_gap: float = 1e-4, max_evaluations: int = 60,
               deadline: float | None = None) -> LagrangianResult | None:
    """Bound and plan by bisection on the byte multiplier; ``None`` if no plan fits (see min_weight_bytes).

    ``deadline`` (a ``time.perf_counter()`` instant): stop there with the best plan and bound so far.
    """
    t0 = time.perf_counter()
    relax = _Relaxation(inst)
    cap = relax.cap
    best_bound, evals = -math.inf, 0
    best: tuple[float, Decisions] | None = None

    def evaluate(lam: float) -> tuple[float, Decisions, int]:
        nonlocal best_bound, evals, best
        value, d, nbytes = relax.solve(lam)
        evals += 1
        best_bound = max(best_bound, value)
        if nbytes <= cap:
            d2, _ = spend_leftover(inst, d, nbytes, cap)
            obj = d2.objective(inst)
            if best is None or obj < best[0]:
                best = (obj, d2)
        return value, d, nbytes

    def late() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    _, _, nbytes = evaluate(0.0)
    lam_lo, lam_hi, stopped = 0.0, None, False
    if nbytes > cap:
        scale = max(float(np.abs(inst.pair_cost).sum() + inst.drop_cost.sum()), 1e-12) / max(float(cap), 1.0)
        lam = scale
        for _ in range(80):
            if late():
                stopped = True
                break
            _, _, nbytes = evaluate(lam)
            if nbytes <= cap:
                lam_hi = lam
                break
            lam_lo, lam = lam, lam * 8.0
        if lam_hi is None and not stopped:
            return None
        while evals < max_evaluations and best is not None:
            if (best[0] - best_bound) / max(abs(best[0]), 1e-12) <= rel_gap / 4 or lam_hi - lam_lo <= 1e-15 * lam_hi:
                break
            if late():
                stopped = True
                break
            lam = math.sqrt(lam_lo * lam_hi) if lam_lo > 0 else lam_hi / 8.0
            _, _, nbytes = evaluate(lam)
            if nbytes <= cap:
                lam_hi = lam
            else:
                lam_lo = lam
    if best is None:  # stopped before any multiplier gave a plan that fits: take the smallest plan
        best = _smallest_plan(inst, relax)
        if best is None:
            return None
    obj, d = best
    return LagrangianResult(d, obj, min(best_bound, obj), lam_hi or 0.0, evals, time.perf_counter() - t0, stopped)


def _smallest_plan(inst: Instance, relax: _Relaxation) -> tuple[float, Decisions] | None:
    """The plan with the fewest bytes (then spare bytes spent on upgrades); ``None`` if even it does not fit."""
    _, d, nbytes = relax.solve(1.0, cost_weight=0.0)
    if nbytes > relax.cap:
        return None
    d, _ = spend_leftover(inst, d, nbytes, relax.cap)
    return d.objective(inst), d
