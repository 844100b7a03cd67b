"""``--target llamacpp`` solved exactly: enumerate the expert count (and k), then a multiple-choice knapsack.

    python -m optimizer solve examples/deepseek-v3/profile.json.gz --budget 128GB --target llamacpp -o plan.json
    python -m optimizer solve examples/deepseek-v3/profile.json.gz --budget 128GB --target llamacpp \
        --min-tokens-per-s 25 -o plan.json

llama.cpp stores all experts of a (layer i, projection p) in one tensor, so a tied plan is one count N = G m of
kept experts per layer (m per group of G), one top-k k for the model, one format f_{i,p} per (layer,
projection) and one format per non-expert block. For a fixed (m, k) the problem separates:

* for a tuple t = (f_p)_p of formats, layer i keeps in every group the m experts of least
  c_e(t) = sum_p sens[e,p,f_p] - drop_e, so the layer costs
      C_i(t, m) = sum_groups (sum of the m least c_e(t)) + sum_e drop_e + g_i(E_i - G m)      (g: prune curve)
  takes  B_i(t, m) = N (sum_p bytes[i,p,f_p] + router_i)  bytes and, under ``--min-tokens-per-s``, reads
  R_i(t, m, k) = k sum_p read[i,p,f_p] + N router_i  per token (all its experts share t, so the slowest kept
  expert of constraint (5) is any of them: the row is exact here);
* the rest is a multiple-choice knapsack with one or two rows: one tuple per layer, one format per non-expert
  block, bytes <= cap (and reads <= limit); the top-k cost sum_i topk[i, k] is a constant. Without a speed row
  only the best k of each m, argmin over k_min <= k <= min(K, TG m, G m), is needed.

Pricing the rows at lam, mu >= 0 splits the knapsack into per-group minima, so
L(lam, mu) = sum_groups min_item (cost + lam bytes + mu read) - lam cap - mu limit is a lower bound for every
price (weak duality). Its maximum over lam for a given mu is found by bisection on the subgradient bytes - cap,
and the maximum over mu by bisection on reads - limit at that lam (L is concave). Every relaxed solution that
meets both rows is a plan; the best one, with spare bytes (and reads) then spent on the upgrades of best cost
decrease per priced resource, is the (m, k)'s plan. Every tied plan has some (m, k), so the least bound over
them bounds the tied optimum. They are searched most promising first: each search's final prices give every
(m, k) not yet searched the bound L at those prices, and one whose bound is no lower than the best plan so far
is dropped unsearched (it cannot win).
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

#: relaxed-problem evaluations per (expert count, k) searched (bisections on the byte price, and on the read price)
MAX_EVALUATIONS = 60
MAX_SPEED_EVALUATIONS = 400
#: ... and a search that has found no plan meeting both rows after this many gives up on its combo
MAX_PLANLESS_EVALUATIONS = 200
#: the bisections stop when the bracket is this narrow relative to its upper end (while the read price is still
#: being raised, the byte price only needs to be close)
PRICE_TOLERANCE = 1e-9
COARSE_TOLERANCE = 1e-2


@dataclass(frozen=True, eq=False)
class TiedResult:
    decisions: Decisions
    objective: float
    bound: float  # min over (expert count, k) of the knapsack's Lagrangian bound: a lower bound on the tied optimum
    experts_per_group: int
    evaluations: int
    seconds: float
    stopped: bool = False  # the deadline ended the search early (plan and bound are still valid)

    @property
    def gap(self) -> float:
        return max(0.0, (self.objective - self.bound) / max(abs(self.objective), 1e-12))


def applicable(inst: Instance) -> bool:
    """Tied, and every layer's router rows the same size per expert (true of every family)."""
    if inst.options.target != Target.LLAMACPP:
        return False
    return all(len(set(inst.router_bytes[_layer_ids(inst, i)].tolist())) == 1 for i in range(len(inst.layer_top_k)))


def _layer_ids(inst: Instance, i: int) -> np.ndarray:
    return inst.layer_first_expert[i] + np.arange(inst.layer_experts[i])


@dataclass(frozen=True)
class _Item:
    """A plan of the knapsack: each layer's tuple and each non-expert block's pair, with its cost, bytes, read."""

    picks: np.ndarray
    pairs: np.ndarray
    cost: float
    nbytes: int
    read: int


class _Tables:
    """The items of every knapsack group for every (expert count, k) and their costs, bytes and reads."""

    def __init__(self, inst: Instance):
        self.inst = inst
        arch = inst.profile.architecture
        projections = list(arch.expert_projections)
        P, F, L = len(projections), len(inst.formats), len(inst.layer_top_k)
        sens = np.full((inst.num_experts, P, F), np.inf)
        nbytes = np.full((L, P, F), -1, dtype=np.int64)
        nread = np.zeros((L, P, F), dtype=np.int64)
        self.pair_of = np.full((inst.num_experts, P, F), -1, dtype=np.int64)
        proj = np.array([projections.index(b.projection) if b.is_routed_expert else -1 for b in arch.blocks])
        ep = np.flatnonzero(inst.block_owner[inst.pair_block] >= 0)
        e = inst.block_owner[inst.pair_block[ep]]
        p, f = proj[inst.pair_block[ep]], inst.pair_format[ep]
        sens[e, p, f] = inst.pair_cost[ep]
        nbytes[inst.expert_layer[e], p, f] = inst.pair_bytes[ep]
        nread[inst.expert_layer[e], p, f] = inst.pair_read[ep]
        self.pair_of[e, p, f] = ep
        self.tuples = np.array(list(product(range(F), repeat=P)), dtype=np.int64).reshape(-1, P)  # [T, P]
        self._combos(inst)
        # per layer and tuple: bytes per kept expert (its router row included; 0 where a projection cannot take
        # the tuple's format), read per routed token, and cost[j, i, t] = C_i(t, ms[j]) (inf where it cannot)
        T = len(self.tuples)
        G = inst.groups
        self.tuple_bytes = np.zeros((L, T), dtype=np.int64)
        self.tuple_read = np.zeros((L, T), dtype=np.int64)
        self.router = np.array([int(inst.router_bytes[_layer_ids(inst, i)[0]]) for i in range(L)], dtype=np.int64)
        self.cost = np.full((len(self.ms), L, T), np.inf)
        for i in range(L):
            ids = _layer_ids(inst, i)
            b = nbytes[i][np.arange(P), self.tuples]  # [T, P]
            ok = np.all(b >= 0, axis=1)
            self.tuple_bytes[i, ok] = b[ok].sum(axis=1) + self.router[i]
            self.tuple_read[i, ok] = nread[i][np.arange(P), self.tuples][ok].sum(axis=1)
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
        self.nx_starts_local = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        self.nx_pairs = np.repeat(self.nx_starts - self.nx_starts_local, sizes) + np.arange(int(sizes.sum()))
        self.nx_block = np.repeat(np.arange(len(q)), sizes)  # the non-expert blocks' pairs, block by block

    def _combos(self, inst: Instance) -> None:
        """The (expert count, k) pairs to search: ``ms`` (experts per group), and per combo c its row ``cj`` in
        ``ms``, its k ``ck`` and top-k cost ``ctopk``; every k allowed under a read limit, else the best k."""
        G, TG, K = inst.groups, inst.topk_groups, int(inst.layer_top_k.max())
        per_group = int(inst.layer_experts.min()) // G
        lo = max(math.ceil(int(inst.layer_min_experts.max()) / G), min(2, per_group) if G > 1 else 1)
        ms = np.arange(lo, per_group + 1)
        kmax = np.minimum(np.minimum(K, TG * ms), G * ms)
        self.ms = ms[kmax >= inst.min_top_k]
        kmax = kmax[kmax >= inst.min_top_k]
        topk_total = sum(inst.topk_cost)
        self.limit = inst.read_limit if inst.options.min_tokens_per_s is not None else None
        cj, ck = [], []
        for j, km in enumerate(kmax.tolist()):
            ks = range(inst.min_top_k, km + 1)
            if self.limit is None:
                ks = [min(ks, key=lambda k: (topk_total[k - 1], k))]
            cj += [j] * len(ks)
            ck += list(ks)
        self.cj, self.ck = np.array(cj, dtype=np.int64), np.array(ck, dtype=np.int64)
        self.ctopk = topk_total[self.ck - 1]

    def experts(self, c: int) -> int:
        return self.inst.groups * int(self.ms[self.cj[c]])

    def least(self) -> tuple[np.ndarray, np.ndarray]:
        """Per combo: the fewest bytes, and the fewest reads, any plan with it takes (each alone)."""
        big = np.iinfo(np.int64).max // 4
        valid = self.tuple_bytes > 0
        per_expert = np.where(valid, self.tuple_bytes, big).min(axis=1)  # [L]
        n = self.inst.groups * self.ms[self.cj]
        nbytes = n * int(per_expert.sum())
        read = np.array([int(np.where(valid, k * self.tuple_read, big).min(axis=1).sum()) for k in self.ck.tolist()])
        read = read + n * int(self.router.sum())
        if len(self.nx_pairs):
            inst = self.inst
            nbytes = nbytes + int(np.minimum.reduceat(inst.pair_bytes[self.nx_pairs], self.nx_starts_local).sum())
            read = read + int(np.minimum.reduceat(inst.pair_read[self.nx_pairs], self.nx_starts_local).sum())
        return nbytes, read

    def relaxed(self, c: int, lam: float, mu: float = 0.0) -> tuple[float, _Item]:
        """At prices (lam, mu) for combo c: the sum of every group's least priced cost plus the top-k cost, and
        the plan of those items."""
        inst, n, k = self.inst, self.experts(c), int(self.ck[c])
        v = self.cost[self.cj[c]] + (lam * n) * self.tuple_bytes
        if mu:
            v = v + (mu * k) * self.tuple_read + (mu * n) * self.router[:, None]
        picks = np.argmin(v, axis=1)
        total = float(self.ctopk[c]) + float(v[np.arange(len(picks)), picks].sum())
        pairs = np.zeros(0, dtype=np.int64)
        if len(self.nx_pairs):
            pv = inst.pair_cost[self.nx_pairs] + lam * inst.pair_bytes[self.nx_pairs]
            if mu:
                pv = pv + mu * inst.pair_read[self.nx_pairs]
            minv, arg = segment_minima(pv, self.nx_starts_local)
            pairs = self.nx_pairs[arg]
            total += float(minv.sum())
        return total, self.item(c, picks, pairs)

    def item(self, c: int, picks: np.ndarray, pairs: np.ndarray) -> _Item:
        inst, n, k = self.inst, self.experts(c), int(self.ck[c])
        rows = np.arange(len(picks))
        cost = float(self.ctopk[c]) + float(self.cost[self.cj[c]][rows, picks].sum())
        nbytes = n * int(self.tuple_bytes[rows, picks].sum())
        read = k * int(self.tuple_read[rows, picks].sum()) + n * int(self.router.sum())
        cost += float(inst.pair_cost[pairs].sum())
        return _Item(picks, pairs, cost, nbytes + int(inst.pair_bytes[pairs].sum()),
                     read + int(inst.pair_read[pairs].sum()))

    def fits(self, it: _Item) -> bool:
        return it.nbytes <= self.inst.capacity and (self.limit is None or it.read <= self.limit)

    def upgrade(self, c: int, it: _Item, lam: float, mu: float) -> _Item:
        """Spend spare bytes (and reads): repeatedly take the change (a layer's tuple or a non-expert block's
        format) of best cost decrease per priced resource (lam bytes + mu reads) that still fits."""
        inst, n, k = self.inst, self.experts(c), int(self.ck[c])
        picks, pairs = it.picks.copy(), it.pairs.copy()
        left_b = inst.capacity - it.nbytes
        left_r = math.inf if self.limit is None else self.limit - it.read
        if lam <= 0 and mu <= 0:  # no price binds: weigh the two resources by their scale
            lam, mu = 1.0 / max(inst.capacity, 1), (0.0 if self.limit is None else 1.0 / max(self.limit, 1.0))
        rows = np.arange(len(picks))
        cost = self.cost[self.cj[c]]
        nx = self.nx_pairs
        while True:
            db = n * (self.tuple_bytes - self.tuple_bytes[rows, picks][:, None])
            dr = k * (self.tuple_read - self.tuple_read[rows, picks][:, None])
            gain = np.where(np.isfinite(cost), cost[rows, picks][:, None] - cost, -math.inf)
            s, best_layer = _best_ratio(gain, db, dr, left_b, left_r, lam, mu)
            s2, best_block = -1, -math.inf
            if len(nx):
                cur = pairs[self.nx_block]
                s2, best_block = _best_ratio(inst.pair_cost[cur] - inst.pair_cost[nx],
                                             inst.pair_bytes[nx] - inst.pair_bytes[cur],
                                             inst.pair_read[nx] - inst.pair_read[cur], left_b, left_r, lam, mu)
            if s < 0 and s2 < 0:
                return self.item(c, picks, pairs)
            if s >= 0 and best_layer >= best_block:
                i, t = divmod(s, db.shape[1])
                left_b, left_r = left_b - int(db[i, t]), left_r - int(dr[i, t])
                picks[i] = t
            else:
                new, old = nx[s2], pairs[self.nx_block[s2]]
                left_b -= int(inst.pair_bytes[new] - inst.pair_bytes[old])
                left_r -= int(inst.pair_read[new] - inst.pair_read[old])
                pairs[self.nx_block[s2]] = new

    def decisions(self, c: int, it: _Item) -> Decisions:
        inst, m = self.inst, int(self.ms[self.cj[c]])
        picks, pairs = it.picks, it.pairs
        keep = np.zeros(inst.num_experts, dtype=bool)
        chosen = np.zeros(len(inst.pair_block), dtype=bool)
        P = self.tuples.shape[1]
        for i, r in enumerate(picks.tolist()):
            t = self.tuples[r]
            ids = _layer_ids(inst, i)
            pair = self.pair_of[ids][:, np.arange(P), t]  # [E_i, P]
            ce = inst.pair_cost[pair].sum(axis=1) - inst.drop_cost[ids]
            order = np.argsort(ce.reshape(inst.groups, -1), axis=1, kind="stable")[:, :m]
            kept = np.take_along_axis(ids.reshape(inst.groups, -1), order, 1).ravel()
            keep[kept] = True
            chosen[self.pair_of[kept][:, np.arange(P), t].ravel()] = True
        chosen[pairs] = True
        return Decisions(keep, np.full(len(inst.layer_top_k), int(self.ck[c])), chosen)


def _best_ratio(gain: np.ndarray, db: np.ndarray, dr: np.ndarray, left_b: float, left_r: float, lam: float,
                mu: float) -> tuple[int, float]:
    """The change (flat index) of best cost decrease per priced resource among those that lower the cost and fit
    what is left; (-1, -inf) if none. A change that frees both resources is taken first."""
    ok = (gain > 0) & (db <= left_b) & (dr <= left_r)
    if not ok.any():
        return -1, -math.inf
    weight = lam * np.maximum(db, 0) + mu * np.maximum(dr, 0)
    ratio = np.where(ok, np.where(weight > 0, gain / np.where(weight > 0, weight, 1.0), math.inf), -math.inf)
    s = int(np.argmax(ratio))
    return s, float(ratio.flat[s])


class _Search:
    """The search of one combo: the best bound, the best plan that meets every row, the evaluations."""

    def __init__(self, tables: _Tables, c: int, deadline: float | None, incumbent: float, rel_gap: float):
        self.t, self.c, self.deadline, self.incumbent, self.rel_gap = tables, c, deadline, incumbent, rel_gap
        self.bound, self.best, self.evals, self.stopped = -math.inf, None, 0, False
        self.cap = tables.inst.capacity
        self.limit = 0.0 if tables.limit is None else tables.limit

    def evaluate(self, lam: float, mu: float) -> _Item:
        value, it = self.t.relaxed(self.c, lam, mu)
        self.evals += 1
        self.bound = max(self.bound, value - lam * self.cap - mu * self.limit)
        if self.t.fits(it) and (self.best is None or it.cost < self.best.cost):
            self.best = it
        return it

    def done(self) -> bool:
        """Nothing more to learn: the bound rules this combo out, its plan is within a quarter of the gap, the
        evaluations are spent, or the deadline passed (``stopped``)."""
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.stopped = True
        close = self.best is not None and self.best.cost - self.bound <= 0.25 * self.rel_gap * abs(self.bound)
        most = MAX_EVALUATIONS if self.t.limit is None else MAX_SPEED_EVALUATIONS
        if self.best is None and self.t.limit is not None:
            most = MAX_PLANLESS_EVALUATIONS
        return self.stopped or close or self.bound >= self.incumbent or self.evals >= most

    def byte_price(self, mu: float, start: float, tolerance: float = PRICE_TOLERANCE) -> tuple[float, _Item | None]:
        """The least byte price lam (bisection in log scale from ``start``, to ``tolerance``) at which the relaxed
        plan at (lam, mu) fits the byte row, and that plan; (lam, None) if the search ended first."""
        it = self.evaluate(0.0, mu)
        if it.nbytes <= self.cap:
            return 0.0, it
        lo, hi, at_hi, lam = 0.0, None, None, start
        while hi is None and not self.done():
            it = self.evaluate(lam, mu)
            if it.nbytes <= self.cap:
                hi, at_hi = lam, it
            else:
                lo, lam = lam, lam * 8.0
        while hi is not None and hi - lo > tolerance * hi and not self.done():
            lam = math.sqrt(lo * hi) if lo > 0 else hi / 8.0
            it = self.evaluate(lam, mu)
            if it.nbytes <= self.cap:
                hi, at_hi = lam, it
            else:
                lo = lam
        return (lam if hi is None else hi), at_hi

    def run(self, start: float) -> tuple[float, float]:
        """Maximise L over (lam, mu); returns the last prices (lam at the read price that meets the read row)."""
        lam, it = self.byte_price(0.0, start)
        if self.t.limit is None or it is None or it.read <= self.limit:
            return lam, 0.0  # without a read row, or where it does not bind at the best byte price
        mu_lo, mu_hi, mu = 0.0, None, max(lam, start)
        while mu_hi is None and not self.done():  # raise the read price until the plan reads little enough
            lam, it = self.byte_price(mu, lam or start, COARSE_TOLERANCE)
            if it is not None and it.read <= self.limit:
                mu_hi = mu
            else:
                mu_lo, mu = mu, mu * 8.0
        best_lam = lam
        while mu_hi is not None and mu_hi - mu_lo > PRICE_TOLERANCE * mu_hi and not self.done():
            mu = math.sqrt(mu_lo * mu_hi) if mu_lo > 0 else mu_hi / 8.0
            lam, it = self.byte_price(mu, lam or start)
            if it is not None and it.read <= self.limit:
                mu_hi, best_lam = mu, lam
            else:
                mu_lo = mu
        return best_lam, (mu if mu_hi is None else mu_hi)


def tied_exact(inst: Instance, rel_gap: float = 1e-4, deadline: float | None = None) -> TiedResult | None:
    """The best tied plan over all (expert count, k) with its proven bound (module docstring); ``None`` if no
    plan fits (or none was found by ``deadline``, a ``time.perf_counter()`` instant).

    Combos are searched most promising first: each search's final prices p give every combo not yet searched
    the bound L(p), and a combo whose bound is no lower than the best plan is dropped unsearched. The first
    search is of the most experts, and the largest k, that can fit."""
    t0 = time.perf_counter()
    t = _Tables(inst)
    least_bytes, least_read = t.least()
    possible = (least_bytes <= inst.capacity) & (True if t.limit is None else least_read <= t.limit)
    bounds = np.where(possible, -np.inf, np.inf)  # per combo: the best bound so far; inf: cannot fit
    pending = [int(c) for c in np.flatnonzero(possible)]
    scale = max(float(np.abs(inst.pair_cost).sum() + np.abs(inst.drop_cost).sum()), 1e-12) / max(inst.capacity, 1)
    best: tuple[_Item, int] | None = None
    evals, stopped, prices = 0, False, None
    while pending:
        if deadline is not None and time.perf_counter() >= deadline:
            stopped = True
            break
        incumbent = math.inf if best is None else best[0].cost
        if prices is not None:
            lam, mu = prices
            for c in pending:
                value, _ = t.relaxed(c, lam, mu)
                bounds[c] = max(bounds[c], value - lam * inst.capacity - mu * (t.limit or 0.0))
            evals += len(pending)
            pending = [c for c in pending if bounds[c] < incumbent]
            if not pending:
                break
        c = pending.pop(max(range(len(pending)), key=lambda n: (-bounds[pending[n]], pending[n])))
        search = _Search(t, c, deadline, incumbent, rel_gap)
        prices = search.run(prices[0] if prices is not None and prices[0] > 0 else scale)
        evals += search.evals
        stopped |= search.stopped
        bounds[c] = max(bounds[c], search.bound)
        if bounds[c] >= incumbent:
            continue  # this combo cannot beat the best plan so far
        if search.best is None:
            continue  # no plan found that meets every row
        it = t.upgrade(c, search.best, *prices)
        if it.cost < incumbent:
            best = (it, c)
    if best is None:
        return None
    it, c = best
    d = t.decisions(c, it)
    objective = d.objective(inst)
    return TiedResult(d, objective, min(float(bounds.min()), objective), int(t.ms[t.cj[c]]), evals,
                      time.perf_counter() - t0, stopped)


__all__ = ["TiedResult", "applicable", "tied_exact"]
