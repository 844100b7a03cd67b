"""``--target llamacpp`` solved exactly: enumerate the expert count, then a multiple-choice knapsack.

    python -m optimizer solve examples/deepseek-v3/profile.json.gz --budget 128GB --target llamacpp -o plan.json

llama.cpp stores all experts of a (layer i, projection p) in one tensor, so a tied plan is one count N = G m of
kept experts per layer (m per group of G), one top-k k for the model, one format f_{i,p} per (layer,
projection) and one format per non-expert block. For a fixed m the problem separates:

* k only meets the top-k costs: k*(m) = argmin_{k_min <= k <= min(K, TG m, G m)} sum_i topk[i, k];
* for a tuple t = (f_p)_p of formats, layer i keeps in every group the m experts of least
  c_e(t) = sum_p sens[e,p,f_p] - drop_e, so the layer costs
      C_i(t, m) = sum_groups (sum of the m least c_e(t)) + sum_e drop_e + g_i(E_i - G m)      (g: prune curve)
  and takes  B_i(t, m) = G m (sum_p bytes[i,p,f_p] + router_row_i)  bytes;
* the rest is a multiple-choice knapsack: one tuple per layer, one format per non-expert block, bytes <= cap.

Pricing the byte row at lam >= 0 splits the knapsack into per-group minima, so
L_m(lam) = sum_groups min_item (cost + lam bytes) - lam cap is a lower bound for every lam (weak duality), and
its maximum (the knapsack's LP bound) is found by bisection on the subgradient bytes - cap. The plan at the
smallest price that fits, with spare bytes then spent on the upgrades of best cost decrease per byte, is
feasible. Every plan has some m, so min_m max_lam L_m is a bound on the tied optimum; the plan is the best over
m, and an m whose bound is no lower than the best plan so far is not searched (it cannot win).
Valid without ``--min-tokens-per-s`` (the speed row couples k and formats; those instances go to the MILP).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from itertools import product

import numpy as np

from ..plan import Target
from .decisions import Decisions
from .decomposition import segment_minima
from .instance import Instance

#: bisection steps on the byte price per expert count (each halves the bracket in log scale)
MAX_EVALUATIONS = 60


@dataclass(frozen=True, eq=False)
class TiedResult:
    decisions: Decisions
    objective: float
    bound: float  # min over expert counts of the knapsack's LP bound: a proven lower bound on the tied optimum
    experts_per_group: int
    evaluations: int
    seconds: float
    stopped: bool = False  # the deadline ended the search early (plan and bound are still valid)

    @property
    def gap(self) -> float:
        return max(0.0, (self.objective - self.bound) / max(abs(self.objective), 1e-12))


def applicable(inst: Instance) -> bool:
    """Tied, no speed floor, and every layer's router rows the same size per expert (true of every family)."""
    if inst.options.target != Target.LLAMACPP or inst.options.min_tokens_per_s is not None:
        return False
    return all(len(set(inst.router_bytes[_layer_ids(inst, i)].tolist())) == 1 for i in range(len(inst.layer_top_k)))


def _layer_ids(inst: Instance, i: int) -> np.ndarray:
    return inst.layer_first_expert[i] + np.arange(inst.layer_experts[i])


class _Tables:
    """Per expert count: the items of every knapsack group and their costs and bytes."""

    def __init__(self, inst: Instance):
        self.inst = inst
        arch = inst.profile.architecture
        projections = list(arch.expert_projections)
        P, F, L = len(projections), len(inst.formats), len(inst.layer_top_k)
        sens = np.full((inst.num_experts, P, F), np.inf)
        nbytes = np.full((L, P, F), -1, dtype=np.int64)
        self.pair_of = np.full((inst.num_experts, P, F), -1, dtype=np.int64)
        proj = np.array([projections.index(b.projection) if b.is_routed_expert else -1 for b in arch.blocks])
        ep = np.flatnonzero(inst.block_owner[inst.pair_block] >= 0)
        e = inst.block_owner[inst.pair_block[ep]]
        p, f = proj[inst.pair_block[ep]], inst.pair_format[ep]
        sens[e, p, f] = inst.pair_cost[ep]
        nbytes[inst.expert_layer[e], p, f] = inst.pair_bytes[ep]
        self.pair_of[e, p, f] = ep
        self.tuples = np.array(list(product(range(F), repeat=P)), dtype=np.int64).reshape(-1, P)  # [T, P]
        G, TG, K = inst.groups, inst.topk_groups, int(inst.layer_top_k.max())
        per_group = int(inst.layer_experts.min()) // G
        lo = max(math.ceil(int(inst.layer_min_experts.max()) / G), min(2, per_group) if G > 1 else 1)
        ms = np.arange(lo, per_group + 1)
        kmax = np.minimum(np.minimum(K, TG * ms), G * ms)
        self.ms = ms[kmax >= inst.min_top_k]
        topk_total = sum(inst.topk_cost)
        self.k = np.array([inst.min_top_k + int(np.argmin(topk_total[inst.min_top_k - 1:int(km)]))
                           for km in kmax[kmax >= inst.min_top_k]], dtype=np.int64)
        self.topk = topk_total[self.k - 1]
        # tuple_bytes[i, t]: bytes per kept expert of layer i with tuple t (its router row included; 0 where a
        # projection cannot take t's format); cost[j, i, t] = C_i(t, ms[j]) (inf where it cannot)
        T = len(self.tuples)
        self.tuple_bytes = np.zeros((L, T), dtype=np.int64)
        self.cost = np.full((len(self.ms), L, T), np.inf)
        for i in range(L):
            ids = _layer_ids(inst, i)
            b = nbytes[i][np.arange(P), self.tuples]  # [T, P]
            ok = np.all(b >= 0, axis=1)
            self.tuple_bytes[i, ok] = b[ok].sum(axis=1) + int(inst.router_bytes[ids[0]])
            acc = sens[ids, 0]  # [E_i, F]: c_e(t) for every tuple t, built one projection at a time
            for p in range(1, P):
                acc = (acc[:, :, None] + sens[ids, p][:, None, :]).reshape(len(ids), -1)
            c = np.ascontiguousarray((acc - inst.drop_cost[ids][:, None]).T[ok]).reshape(int(ok.sum()), G, -1)
            c.sort(axis=2)
            prefix = np.cumsum(c.sum(axis=1), axis=1)  # [T', per_group]: the m least of every group, summed
            count = 0.0 if inst.prune_count_cost is None else inst.prune_count_cost[i][ids.size - G * self.ms]
            self.cost[:, i, ok] = (prefix[:, self.ms - 1] + float(inst.drop_cost[ids].sum()) + count).T
        q = np.flatnonzero(inst.block_quantizable & (inst.block_owner < 0))
        self.nx_starts = inst.pair_ptr[q]
        sizes = inst.pair_ptr[q + 1] - self.nx_starts
        self.nx_pairs = np.repeat(self.nx_starts - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes) + \
            np.arange(int(sizes.sum()))  # the non-expert blocks' pairs, block by block
        self.nx_block = np.repeat(np.arange(len(q)), sizes)
        self.nx_starts_local = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def least_bytes(self) -> np.ndarray:
        """Per expert count: the fewest bytes any plan with it takes."""
        big = np.iinfo(np.int64).max // 4
        per_layer = np.where(self.tuple_bytes > 0, self.tuple_bytes, big).min(axis=1).sum()
        nx = 0
        if len(self.nx_pairs):
            nx = int(np.minimum.reduceat(self.inst.pair_bytes[self.nx_pairs], self.nx_starts_local).sum())
        return self.inst.groups * self.ms * int(per_layer) + nx

    def experts(self, j: int) -> int:
        return self.inst.groups * int(self.ms[j])

    def relaxed(self, j: int, lam: float) -> tuple[float, int, np.ndarray, np.ndarray]:
        """At price lam with m = ms[j]: (sum of every group's least priced cost + top-k cost, the bytes of those
        items, each layer's tuple, each non-expert block's pair)."""
        inst, n = self.inst, self.experts(j)
        v = self.cost[j] + (lam * n) * self.tuple_bytes
        picks = np.argmin(v, axis=1)
        rows = np.arange(len(picks))
        total = float(self.topk[j]) + float(v[rows, picks].sum())
        nbytes = n * int(self.tuple_bytes[rows, picks].sum())
        pairs = np.zeros(0, dtype=np.int64)
        if len(self.nx_pairs):
            pv = inst.pair_cost[self.nx_pairs] + lam * inst.pair_bytes[self.nx_pairs]
            minv, arg = segment_minima(pv, self.nx_starts_local)
            pairs = self.nx_pairs[arg]
            total += float(minv.sum())
            nbytes += int(inst.pair_bytes[pairs].sum())
        return total, nbytes, picks, pairs

    def plan_cost(self, j: int, picks: np.ndarray, pairs: np.ndarray) -> tuple[float, int]:
        rows = np.arange(len(picks))
        cost = float(self.topk[j]) + float(self.cost[j][rows, picks].sum()) + float(self.inst.pair_cost[pairs].sum())
        nbytes = self.experts(j) * int(self.tuple_bytes[rows, picks].sum()) + int(self.inst.pair_bytes[pairs].sum())
        return cost, nbytes

    def upgrade(self, j: int, picks: np.ndarray, pairs: np.ndarray, left: int) -> tuple[np.ndarray, np.ndarray]:
        """Spend ``left`` spare bytes: repeatedly take the item change (of a layer's tuple or a non-expert
        block's format) of best cost decrease per extra byte that still fits."""
        inst, n = self.inst, self.experts(j)
        picks, pairs = picks.copy(), pairs.copy()
        rows = np.arange(len(picks))
        cost = self.cost[j]
        while True:
            db = n * (self.tuple_bytes - self.tuple_bytes[rows, picks][:, None])
            dc = cost[rows, picks][:, None] - cost
            ratio = np.where((db > 0) & (db <= left) & (dc > 0), dc / np.maximum(db, 1), -1.0)
            s = int(np.argmax(ratio))
            best_layer = float(ratio.flat[s])
            best_block = -1.0
            if len(self.nx_pairs):
                cur = pairs[self.nx_block]
                db2 = inst.pair_bytes[self.nx_pairs] - inst.pair_bytes[cur]
                dc2 = inst.pair_cost[cur] - inst.pair_cost[self.nx_pairs]
                ratio2 = np.where((db2 > 0) & (db2 <= left) & (dc2 > 0), dc2 / np.maximum(db2, 1), -1.0)
                s2 = int(np.argmax(ratio2))
                best_block = float(ratio2[s2])
            if max(best_layer, best_block) <= 0:
                return picks, pairs
            if best_layer >= best_block:
                i, t = divmod(s, db.shape[1])
                left -= int(db[i, t])
                picks[i] = t
            else:
                left -= int(db2[s2])
                pairs[self.nx_block[s2]] = self.nx_pairs[s2]

    def decisions(self, j: int, picks: np.ndarray, pairs: np.ndarray) -> Decisions:
        inst, m = self.inst, int(self.ms[j])
        keep = np.zeros(inst.num_experts, dtype=bool)
        chosen = np.zeros(len(inst.pair_block), dtype=bool)
        P = self.tuples.shape[1]
        for i, r in enumerate(picks.tolist()):
            t = self.tuples[r]
            ids = _layer_ids(inst, i)
            pair = self.pair_of[ids][:, np.arange(P), t]  # [E_i, P]
            c = inst.pair_cost[pair].sum(axis=1) - inst.drop_cost[ids]
            order = np.argsort(c.reshape(inst.groups, -1), axis=1, kind="stable")[:, :m]
            kept = np.take_along_axis(ids.reshape(inst.groups, -1), order, 1).ravel()
            keep[kept] = True
            chosen[self.pair_of[kept][:, np.arange(P), t].ravel()] = True
        chosen[pairs] = True
        return Decisions(keep, np.full(len(inst.layer_top_k), int(self.k[j])), chosen)


def _search(tables: _Tables, j: int, cap: int, deadline: float | None, incumbent: float, rel_gap: float
            ) -> tuple[float, tuple[np.ndarray, np.ndarray] | None, float, int, bool]:
    """max_lam L_m(lam) for m = ms[j] by bisection: (bound, the plan at the smallest fitting price found (None if
    none fits), that price, evaluations, ``stopped``: the deadline passed). The bisection ends
    early once the bound reaches ``incumbent`` (this m cannot give a better plan) or the fitting plan is within
    a quarter of ``rel_gap`` of the bound."""
    value, nbytes, picks, pairs = tables.relaxed(j, 0.0)
    evals, bound = 1, value
    if nbytes <= cap:
        return bound, (picks, pairs), 0.0, evals, False
    inst = tables.inst
    scale = max(float(np.abs(inst.pair_cost).sum() + np.abs(inst.drop_cost).sum()), 1e-12) / max(float(cap), 1.0)
    lo, hi, fit, lam = 0.0, None, None, scale

    def late() -> bool:
        return deadline is not None and time.perf_counter() >= deadline

    while hi is None and evals < MAX_EVALUATIONS:  # raise the price until the least priced plan fits
        if late():
            return bound, fit, lam, evals, True
        value, nbytes, picks, pairs = tables.relaxed(j, lam)
        evals += 1
        bound = max(bound, value - lam * cap)
        if nbytes <= cap:
            hi, fit = lam, (picks, pairs)
        else:
            lo, lam = lam, lam * 8.0
    if hi is None:
        return bound, None, lam, evals, False
    while evals < MAX_EVALUATIONS and hi - lo > 1e-9 * hi:  # then bisect in log scale
        if bound >= incumbent or tables.plan_cost(j, *fit)[0] - bound <= 0.25 * rel_gap * abs(bound):
            break
        if late():
            return bound, fit, hi, evals, True
        lam = math.sqrt(lo * hi) if lo > 0 else hi / 8.0
        value, nbytes, picks, pairs = tables.relaxed(j, lam)
        evals += 1
        bound = max(bound, value - lam * cap)
        if nbytes <= cap:
            hi, fit = lam, (picks, pairs)
        else:
            lo = lam
    return bound, fit, hi, evals, False


def tied_exact(inst: Instance, rel_gap: float = 1e-4, deadline: float | None = None) -> TiedResult | None:
    """The best tied plan over all expert counts with its proven bound (module docstring); ``None`` if no plan
    fits (or none was found by ``deadline``, a ``time.perf_counter()`` instant).

    Expert counts are searched most promising first: each search's final price p gives every count not yet
    searched the bound L_m(p), and a count whose bound is no lower than the best plan is dropped unsearched.
    The first search is of the most experts that fit."""
    t0 = time.perf_counter()
    tables = _Tables(inst)
    cap = inst.capacity
    least = tables.least_bytes()
    bounds = np.where(least <= cap, -np.inf, np.inf)  # per m: the best bound so far; inf: cannot fit
    pending = [int(j) for j in np.flatnonzero(least <= cap)]
    best: tuple[float, int, np.ndarray, np.ndarray] | None = None
    evals, stopped, price = 0, False, None
    while pending:
        if deadline is not None and time.perf_counter() >= deadline:
            stopped = True
            break
        incumbent = math.inf if best is None else best[0]
        if price is not None:
            for j in pending:
                bounds[j] = max(bounds[j], tables.relaxed(j, price)[0] - price * cap)
            evals += len(pending)
            pending = [j for j in pending if bounds[j] < incumbent]
            if not pending:
                break
        j = pending.pop(max(range(len(pending)), key=lambda n: (-bounds[pending[n]], pending[n])))
        bound, fit, price, n, late = _search(tables, j, cap, deadline, incumbent, rel_gap)
        evals += n
        stopped |= late
        bounds[j] = max(bounds[j], bound)
        if fit is None or bounds[j] >= incumbent:
            continue  # this expert count cannot beat the best plan so far
        cost, nbytes = tables.plan_cost(j, *fit)
        picks, pairs = tables.upgrade(j, *fit, cap - nbytes)
        cost, nbytes = tables.plan_cost(j, picks, pairs)
        if cost < incumbent:
            best = (cost, j, picks, pairs)
    if best is None:
        return None
    _, j, picks, pairs = best
    d = tables.decisions(j, picks, pairs)
    objective = d.objective(inst)
    return TiedResult(d, objective, min(float(bounds.min()), objective), int(tables.ms[j]), evals,
                      time.perf_counter() - t0, stopped)


__all__ = ["TiedResult", "applicable", "tied_exact"]
