"""A plan that meets ``--min-tokens-per-s`` fast, for ``--target hf``: the Lagrangian plan, slowed down by the
cheapest moves until it is fast enough.

The speed row (5) of :mod:`.constraints` prices layer i's decode time as ``k_i`` times its slowest kept expert
(the sum of the read bytes of its blocks), so the Lagrangian decomposition, which splits the problem expert by
expert, cannot carry it. This heuristic keeps the decomposition and restricts it instead. A *policy* gives every
MoE layer a largest top-k ``kmax_i`` and a largest expert format level ``level_i`` (an index into the candidate
formats sorted by bits per weight), and every other block the largest format it may keep. Starting from the
unconstrained Lagrangian plan (every restriction open), it repeats:

1. while the plan's bytes read per token exceed the limit, apply the move with the smallest estimated loss
   increase per byte read saved: lower ``kmax_i`` by one (saves the layer's slowest expert, costs the
   top-k cost difference), lower ``level_i`` by one format (every kept expert block above it moves to its
   cheapest format below; saves ``k_i`` times the drop of the slowest expert), prune one expert per group of
   layer i, the one whose drop costs least (saves its router row, which every token reads, and the slowest
   expert's excess if it was the slowest), or move one non-expert block to its cheapest smaller format (saves
   the difference in its reads);
2. solve the restricted problem with the Lagrangian decomposition (all restrictions at once: pairs above a
   block's level removed, ``K_i`` lowered to ``kmax_i``), which re-spends the bytes the moves freed without
   leaving the policy; non-expert blocks may only keep or lower their format, so their reads never grow;
3. stop when the re-solved plan meets the row exactly (as the MILP computes it), or when no move is left or
   the deadline passes (``None``).

The plan is not optimal for the speed-constrained problem; its bound is the unconstrained Lagrangian bound (a
relaxation), so the reported gap is honest and shrinks as the floor binds less. :func:`fastest_read` is the
least any plan within the budget can read per token (every layer at its smallest top-k, every block at its
fewest-read format): a floor above it is infeasible, and the solver says so with the tokens/s it can reach.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import numpy as np

from ..formats import get_format
from .decisions import Decisions
from .decomposition import LagrangianResult, lagrangian, segment_minima
from .instance import Instance

#: rounds of (moves, re-solve) before giving up
MAX_ROUNDS = 60


def _expert_read(inst: Instance, d: Decisions) -> np.ndarray:
    """Bytes read per token by each expert's chosen blocks (0 for pruned experts)."""
    chosen = np.flatnonzero(d.chosen)
    owner = inst.block_owner[inst.pair_block[chosen]]
    mine = owner >= 0
    return np.bincount(owner[mine], weights=inst.pair_read[chosen[mine]].astype(float), minlength=inst.num_experts)


def plan_read(inst: Instance, d: Decisions) -> float:
    """The speed row's left side for ``d``: non-expert reads, router rows of kept experts, and per MoE layer k
    times its slowest kept expert (constraints (5))."""
    chosen = np.flatnonzero(d.chosen)
    nonexpert = inst.block_owner[inst.pair_block[chosen]] < 0
    total = float(inst.pair_read[chosen[nonexpert]].sum()) + float(inst.router_bytes[d.keep].sum())
    per_expert = np.where(d.keep, _expert_read(inst, d), 0.0)
    slowest = np.zeros(len(inst.layer_top_k))
    np.maximum.at(slowest, inst.expert_layer, per_expert)
    return total + float((d.top_k * slowest).sum())


def fastest_read(inst: Instance) -> float:
    """A lower bound on the bytes any plan reads per token: smallest top-k everywhere, every block at its
    fewest-read format, each layer's slowest expert at that (pruning does not lower it), and the router rows of
    the fewest experts a layer may keep."""
    starts = inst.pair_ptr[:-1][np.diff(inst.pair_ptr) > 0]
    least = np.minimum.reduceat(inst.pair_read.astype(float), starts)
    blocks = inst.pair_block[starts]
    owner = inst.block_owner[blocks]
    per_expert = np.bincount(owner[owner >= 0], weights=least[owner >= 0], minlength=inst.num_experts)
    slowest = np.zeros(len(inst.layer_top_k))
    np.maximum.at(slowest, inst.expert_layer, per_expert)
    routers = 0.0  # the router rows of the fewest experts a layer may keep
    for i in range(len(inst.layer_top_k)):
        ids = inst.layer_first_expert[i] + np.arange(inst.layer_experts[i])
        need = max(int(inst.layer_min_experts[i]), inst.min_top_k, 2 * inst.groups if inst.groups > 1 else 0)
        routers += float(np.sort(inst.router_bytes[ids])[:need].sum())
    return float(least[owner < 0].sum()) + routers + float(inst.min_top_k * slowest.sum())


class _Policy:
    """The restrictions (module docstring), the restricted instance they define, and the moves between them."""

    def __init__(self, inst: Instance, start: Decisions):
        self.inst = inst
        order = sorted(range(len(inst.formats)), key=lambda j: get_format(inst.formats[j]).bits_per_weight)
        rank = np.empty(len(inst.formats), dtype=int)
        rank[order] = np.arange(len(order))
        self.levels = len(order)
        self.pair_rank = rank[inst.pair_format]
        owner = inst.block_owner[inst.pair_block]
        self.pair_layer = np.where(owner >= 0, inst.expert_layer[np.maximum(owner, 0)], -1)
        self.kmax = np.array(start.top_k, dtype=int)
        self.level = np.full(len(inst.layer_top_k), self.levels - 1)
        # every block: the format the unconstrained plan gave it is the largest it may keep
        self.block_level = np.full(len(inst.block_owner), self.levels - 1)
        chosen = np.flatnonzero(start.chosen)
        self.block_level[inst.pair_block[chosen]] = self.pair_rank[chosen]
        # below[L][b]: block b's cheapest pair of rank < L (-1: none)
        self.below = np.full((self.levels + 1, len(inst.block_owner)), -1, dtype=np.int64)
        for level in range(1, self.levels + 1):
            ok = np.flatnonzero(self.pair_rank < level)
            cost = inst.pair_cost[ok]
            order_ok = np.lexsort((cost, inst.pair_block[ok]))  # by block, then cost
            blocks = inst.pair_block[ok][order_ok]
            first = np.ones(len(blocks), dtype=bool)
            first[1:] = blocks[1:] != blocks[:-1]
            self.below[level, blocks[first]] = ok[order_ok][first]
        self.tighten(start)

    def tighten(self, d: Decisions) -> None:
        """Levels down to what ``d`` uses (a level above every kept expert's format restricts nothing)."""
        chosen = np.flatnonzero(d.chosen)
        mine = self.pair_layer[chosen] >= 0
        used = np.zeros(len(self.level), dtype=int)
        np.maximum.at(used, self.pair_layer[chosen[mine]], self.pair_rank[chosen[mine]])
        self.level = np.minimum(self.level, used)
        self.block_level[self.inst.pair_block[chosen]] = np.minimum(self.block_level[self.inst.pair_block[chosen]],
                                                                    self.pair_rank[chosen])

    def restricted(self) -> tuple[Instance, np.ndarray]:
        """The instance with only the allowed pairs and K_i = kmax_i; and its pairs' indices in ``inst``."""
        inst = self.inst
        expert = self.pair_layer >= 0
        allowed = np.where(expert, self.pair_rank <= self.level[np.maximum(self.pair_layer, 0)],
                           self.pair_rank <= self.block_level[inst.pair_block])
        keep = np.flatnonzero(allowed)
        ptr = np.zeros(len(inst.block_owner) + 1, dtype=np.int64)
        np.add.at(ptr, inst.pair_block[keep] + 1, 1)
        sub = replace(inst, pair_block=inst.pair_block[keep], pair_format=inst.pair_format[keep],
                      pair_bytes=inst.pair_bytes[keep], pair_read=inst.pair_read[keep],
                      pair_cost=inst.pair_cost[keep], pair_ptr=np.cumsum(ptr),
                      layer_top_k=np.minimum(inst.layer_top_k, self.kmax))
        return sub, keep

    def layer_move(self, d: Decisions, reads: np.ndarray, i: int) -> tuple[float, str, np.ndarray, np.ndarray]:
        """Layer i's best move from ``d``: (estimated loss per byte read saved, "k" or "level", pairs left,
        pairs taken); score inf when the layer has none."""
        inst = self.inst
        kept = d.keep & (inst.expert_layer == i)
        slowest = float(reads[kept].max()) if kept.any() else 0.0
        k = int(d.top_k[i])
        none = np.zeros(0, dtype=np.int64)
        best = (math.inf, "k", none, none)
        if k > inst.min_top_k and slowest > 0:
            dk = max(float(inst.topk_cost[i][k - 2] - inst.topk_cost[i][k - 1]), 0.0)
            best = (dk / slowest, "k", none, none)
        best = min(best, self.prune_move(d, reads, i), key=lambda m: m[0])
        lvl = int(self.level[i])
        if lvl == 0:
            return best
        chosen = np.flatnonzero(d.chosen)
        old = chosen[(self.pair_layer[chosen] == i) & (self.pair_rank[chosen] >= lvl)]
        new = self.below[lvl, inst.pair_block[old]]
        if np.any(new < 0):
            return best
        owners = inst.block_owner[inst.pair_block[old]]
        delta = np.bincount(owners, weights=(inst.pair_read[new] - inst.pair_read[old]).astype(float),
                            minlength=inst.num_experts)
        saved = k * (slowest - float((reads + delta)[kept].max())) if kept.any() else 0.0
        loss = max(float(inst.pair_cost[new].sum() - inst.pair_cost[old].sum()), 0.0)
        score = loss / saved if saved > 0 else math.inf
        return min(best, (score, "level", old, new), key=lambda m: m[0])

    def prune_move(self, d: Decisions, reads: np.ndarray, i: int) -> tuple[float, str, np.ndarray, np.ndarray]:
        """Layer i's prune move: in every expert group the kept expert whose drop raises the objective least
        (its drop cost less its chosen pairs' costs), as long as every group keeps at least the decomposition's
        minimum and k still fits; (score, "prune", the dropped experts' chosen pairs, the dropped experts)."""
        inst = self.inst
        none = np.zeros(0, dtype=np.int64)
        E, G = int(inst.layer_experts[i]), inst.groups
        ids = (inst.layer_first_expert[i] + np.arange(E)).reshape(G, E // G)
        kept = d.keep[ids]
        counts = kept.sum(axis=1)
        m = int(counts.min())
        m_lo = max(math.ceil(int(inst.layer_min_experts[i]) / G), min(2, E // G) if G > 1 else 0, 1)
        k = int(d.top_k[i])
        if m - 1 < m_lo or k > min(inst.topk_groups * (m - 1), G * (m - 1)) or int(counts.max()) != m:
            return (math.inf, "prune", none, none)
        chosen = np.flatnonzero(d.chosen)
        mine = chosen[inst.block_owner[inst.pair_block[chosen]] >= 0]
        kept_cost = np.bincount(inst.block_owner[inst.pair_block[mine]], weights=inst.pair_cost[mine],
                                minlength=inst.num_experts)
        rise = np.where(kept, inst.drop_cost[ids] - kept_cost[ids], np.inf)
        drop = ids[np.arange(G), np.argmin(rise, axis=1)]
        loss = float(rise.min(axis=1).sum())
        if inst.prune_count_cost is not None:
            g, pruned = inst.prune_count_cost[i], E - G * m
            loss += float(g[pruned + G] - g[pruned])
        layer_kept = d.keep & (inst.expert_layer == i)
        after = layer_kept.copy()
        after[drop] = False
        saved = (float(inst.router_bytes[drop].sum())
                 + k * (float(reads[layer_kept].max()) - float(reads[after].max())))
        if saved <= 0:
            return (math.inf, "prune", none, none)
        pairs = mine[np.isin(inst.block_owner[inst.pair_block[mine]], drop)]
        return (max(loss, 0.0) / saved, "prune", pairs, drop)

    def block_move(self, d: Decisions, b: int) -> tuple[float, str, np.ndarray, np.ndarray]:
        """Non-expert block b's move: its cheapest format below the current one (score as :meth:`layer_move`)."""
        inst = self.inst
        s = inst.pairs_of(b)
        cur = s.start + int(np.flatnonzero(d.chosen[s.start:s.stop])[0])
        q = int(self.below[self.pair_rank[cur], b])
        none = np.zeros(0, dtype=np.int64)
        if q < 0 or inst.pair_read[q] >= inst.pair_read[cur]:
            return (math.inf, "block", none, none)
        loss = max(float(inst.pair_cost[q] - inst.pair_cost[cur]), 0.0)
        return (loss / float(inst.pair_read[cur] - inst.pair_read[q]), "block", np.array([cur]), np.array([q]))

    def apply(self, d: Decisions, reads: np.ndarray, i: int, move: tuple[float, str, np.ndarray, np.ndarray]
              ) -> Decisions:
        """``d`` after a move of layer i (or of block i, for a "block" move); ``reads`` updated in place; the
        policy records it."""
        _, kind, old, new = move
        if kind == "k":
            top_k = d.top_k.copy()
            top_k[i] -= 1
            self.kmax[i] = top_k[i]
            return Decisions(d.keep, top_k, d.chosen)
        if kind == "prune":  # old: the dropped experts' chosen pairs, new: the dropped experts
            keep, chosen = d.keep.copy(), d.chosen.copy()
            keep[new], chosen[old] = False, False
            reads[new] = 0.0
            return Decisions(keep, d.top_k, chosen)
        chosen = d.chosen.copy()
        chosen[old], chosen[new] = False, True
        if kind == "block":
            self.block_level[i] = int(self.pair_rank[new[0]])
            return Decisions(d.keep, d.top_k, chosen)
        self.level[i] -= 1
        owners = self.inst.block_owner[self.inst.pair_block[old]]
        np.add.at(reads, owners, (self.inst.pair_read[new] - self.inst.pair_read[old]).astype(float))
        return Decisions(d.keep, d.top_k, chosen)


def _layer_read(inst: Instance, d: Decisions, reads: np.ndarray, i: int) -> float:
    """Layer i's terms of the speed row: k_i times its slowest kept expert's read, plus its kept router rows."""
    kept = d.keep & (inst.expert_layer == i)
    if not kept.any():
        return 0.0
    return float(d.top_k[i]) * float(reads[kept].max()) + float(inst.router_bytes[kept].sum())


def _slow_down(inst: Instance, pol: _Policy, d: Decisions, limit: float, deadline: float | None
               ) -> Decisions | None:
    """Apply the cheapest moves (per byte read saved) until ``d`` meets the speed row; None if it cannot.

    The row's left side is kept up to date move by move (a move changes one layer's term or one block's read);
    every read is a whole number of bytes, so the running float sum is exact and equals :func:`plan_read`."""
    reads = _expert_read(inst, d)
    layers = len(inst.layer_top_k)
    blocks = np.flatnonzero(inst.block_quantizable & (inst.block_owner < 0))
    moves = [pol.layer_move(d, reads, i) for i in range(layers)] + [pol.block_move(d, int(b)) for b in blocks]
    scores = np.array([m[0] for m in moves])
    read = plan_read(inst, d)
    while read > limit:
        j = int(np.argmin(scores))
        if math.isinf(scores[j]) or (deadline is not None and time.perf_counter() >= deadline):
            return None
        if j < layers:
            before = _layer_read(inst, d, reads, j)
            d = pol.apply(d, reads, j, moves[j])
            read += _layer_read(inst, d, reads, j) - before
            moves[j] = pol.layer_move(d, reads, j)
        else:
            target = int(blocks[j - layers])
            _, _, old, new = moves[j]
            d = pol.apply(d, reads, target, moves[j])
            read += float(inst.pair_read[new].sum() - inst.pair_read[old].sum())
            moves[j] = pol.block_move(d, target)
        scores[j] = moves[j][0]
    return d


def speed_plan(inst: Instance, rel_gap: float = 1e-4, deadline: float | None = None,
               start: LagrangianResult | None = None) -> Decisions | None:
    """A plan meeting the budget and the speed row (see the module docstring); None if none was found.
    ``start``: the unconstrained Lagrangian result, when the caller has it."""
    limit = inst.read_limit
    free = replace(inst, options=replace(inst.options, min_tokens_per_s=None))
    first = start or lagrangian(free, rel_gap, deadline=deadline)
    if first is None:
        return None
    d: Decisions | None = first.decisions
    if plan_read(inst, d) <= limit:
        return d
    pol = _Policy(inst, d)
    best: Decisions | None = None
    for _ in range(MAX_ROUNDS):
        d = _slow_down(inst, pol, d, limit, deadline)
        if d is None:
            return best
        if best is None or d.objective(inst) < best.objective(inst):
            best = d  # formats and k only lowered from a plan that fit: within the budget, and fast enough
        sub, index = pol.restricted()
        found = lagrangian(replace(sub, options=free.options), rel_gap, deadline=deadline)
        if found is None:
            return best
        chosen = np.zeros(len(inst.pair_block), dtype=bool)
        chosen[index[found.decisions.chosen]] = True
        d = Decisions(found.decisions.keep, found.decisions.top_k, chosen)
        if plan_read(inst, d) <= limit:
            return d if d.objective(inst) < best.objective(inst) else best
        pol.tighten(d)
    return best




class _SpeedRelaxation:
    """The Lagrangian of the problem with the byte row (multiplier lam) and a relaxed speed row (mu) dualised.

    The speed row prices layer i at ``k_i`` times its slowest kept expert; since the mean of the kept experts'
    reads over all ``E_i`` experts is at most that, ``k_i / E_i * sum_{e kept} read_e`` in its place gives a
    weaker row every plan meeting the real one meets: a relaxation, so ``L(lam, mu)`` is a valid lower bound
    for every ``lam, mu >= 0``. It splits per block and per layer as the byte-row decomposition does, except
    that an expert's priced cost now depends on k, so each layer enumerates (m, k) with the experts re-priced
    for every k.
    """

    def __init__(self, inst: Instance):
        self.inst = inst
        owner = inst.block_owner[inst.pair_block]
        self.expert_pair = owner >= 0
        self.pair_layer = np.where(owner >= 0, inst.expert_layer[np.maximum(owner, 0)], -1)
        q = np.flatnonzero(inst.block_quantizable)
        self.starts = inst.pair_ptr[q]
        self.block_is_expert = inst.block_owner[q] >= 0
        self.block_owner = inst.block_owner[q]
        self.limit = inst.read_limit
        self.ks = sorted({int(k) for K in inst.layer_top_k for k in range(inst.min_top_k, int(K) + 1)})

    def value(self, lam: float, mu: float) -> tuple[float, float, float]:
        """(L(lam, mu), bytes - cap, relaxed read - limit) at the relaxed problem's minimiser."""
        inst = self.inst
        base = inst.pair_cost + lam * inst.pair_bytes
        E = inst.layer_experts.astype(float)
        scale = np.where(self.expert_pair, 0.0, 1.0)  # non-expert blocks: mu * read
        pv0 = base + mu * scale * inst.pair_read
        minv0, arg0 = segment_minima(pv0, self.starts)
        total = float(minv0[~self.block_is_expert].sum()) + float(inst.drop_cost.sum())
        nbytes = float(inst.pair_bytes[arg0[~self.block_is_expert]].sum())
        read = float(inst.pair_read[arg0[~self.block_is_expert]].sum())
        per_k = {}
        for k in self.ks:  # expert blocks priced with mu k / E_i per byte read
            factor = np.where(self.expert_pair, k / E[np.maximum(self.pair_layer, 0)], 0.0)
            pv = base + mu * factor * inst.pair_read
            minv, arg = segment_minima(pv, self.starts)
            ex = self.block_is_expert
            keep_value = np.bincount(self.block_owner[ex], weights=minv[ex], minlength=inst.num_experts)
            eb = np.bincount(self.block_owner[ex], weights=inst.pair_bytes[arg[ex]].astype(float),
                             minlength=inst.num_experts)
            er = np.bincount(self.block_owner[ex], weights=inst.pair_read[arg[ex]].astype(float),
                             minlength=inst.num_experts)
            per_k[k] = (keep_value + (lam + mu) * inst.router_bytes - inst.drop_cost, eb, er)
        G, TG = inst.groups, inst.topk_groups
        for i in range(len(inst.layer_top_k)):
            ids = (inst.layer_first_expert[i] + np.arange(inst.layer_experts[i])).reshape(G, -1)
            per_group = ids.shape[1]
            m_lo = max(math.ceil(int(inst.layer_min_experts[i]) / G), min(2, per_group) if G > 1 else 0)
            best = (math.inf, 0.0, 0.0)
            for k in range(inst.min_top_k, int(inst.layer_top_k[i]) + 1):
                delta, eb, er = per_k[k]
                d = delta[ids]
                order = np.argsort(d, axis=1, kind="stable")
                srt = np.take_along_axis(d, order, 1)
                prefix = np.concatenate([np.zeros((G, 1)), np.cumsum(srt, axis=1)], axis=1)
                ms = np.arange(m_lo, per_group + 1)
                ms = ms[(TG * ms >= k) & (G * ms >= k)]
                if len(ms) == 0:
                    continue
                count = np.zeros(len(ms)) if inst.prune_count_cost is None else \
                    inst.prune_count_cost[i][int(inst.layer_experts[i]) - G * ms]
                vals = prefix[:, ms].sum(axis=0) + count + float(inst.topk_cost[i][k - 1])
                j = int(np.argmin(vals))
                if vals[j] < best[0]:
                    kept = np.take_along_axis(ids, order[:, :int(ms[j])], 1).ravel()
                    best = (float(vals[j]), float(eb[kept].sum() + inst.router_bytes[kept].sum()),
                            float(k / inst.layer_experts[i] * er[kept].sum() + inst.router_bytes[kept].sum()))
            total += best[0]
            nbytes += best[1]
            read += best[2]
        return (total - lam * inst.capacity - mu * self.limit, nbytes - inst.capacity, read - self.limit)


def speed_bound(inst: Instance, lam0: float, deadline: float | None = None, evaluations: int = 60) -> float:
    """A lower bound on the speed-constrained optimum: ``max L(lam, mu)`` of :class:`_SpeedRelaxation`, searched
    by bisection on lam (bytes subgradient) inside a bisection on mu (read subgradient), from the byte
    multiplier ``lam0`` of the unconstrained problem; returns the best value seen (valid at any point)."""
    relax = _SpeedRelaxation(inst)
    best = -math.inf
    count = 0

    def at_mu(mu: float) -> tuple[float, float]:
        """max over lam of L(lam, mu) (approximately), and the read subgradient there."""
        nonlocal best, count
        lo, hi = 0.0, max(lam0, 1e-30)
        val, gb, gr = relax.value(hi, mu)
        count += 1
        while gb > 0 and count < evaluations:  # bytes over: raise lam until they fit
            lo, hi = hi, hi * 4
            val, gb, gr = relax.value(hi, mu)
            count += 1
        best = max(best, val)
        for _ in range(8):
            if count >= evaluations or (deadline is not None and time.perf_counter() >= deadline):
                break
            lam = 0.5 * (lo + hi)
            v, b, r = relax.value(lam, mu)
            count += 1
            best = max(best, v)
            if b > 0:
                lo = lam
            else:
                hi, gr = lam, r
        return best, gr

    _, gr = at_mu(0.0)
    if gr <= 0:
        return best
    mu_lo, mu_hi = 0.0, lam0 or 1e-12
    while count < evaluations and (deadline is None or time.perf_counter() < deadline):
        _, gr = at_mu(mu_hi)
        if gr <= 0:
            break
        mu_lo, mu_hi = mu_hi, mu_hi * 4
    while count < evaluations and (deadline is None or time.perf_counter() < deadline):
        mu = 0.5 * (mu_lo + mu_hi)
        _, gr = at_mu(mu)
        if gr > 0:
            mu_lo = mu
        else:
            mu_hi = mu
    return best


__all__ = ["speed_plan", "speed_bound", "plan_read", "fastest_read"]
