"""Baselines that produce plans in the same format as the ILP, for comparison.

* ``uniform``: no pruning, original top-k, every block in the largest single candidate format that fits
  (a block whose rows the format cannot store takes the same bits in another group size if that is a candidate,
  else the next larger candidate that can).
* ``greedy``: value per byte. Start from every expert kept at the original top-k with every block in its
  smallest format; while over budget, drop the expert slice (one expert per group) with the smallest drop
  cost per freed byte; then, while bytes remain, apply the format upgrade with the largest cost decrease per
  extra byte.
* ``sequential`` (CC-MoE's recipe): keep the top ceil(r E) experts of each layer by I_e = a f_e + (1-a) s_e
  (per group, so groups stay equal), set k = ceil(r K), store everything in the largest format that fits,
  then upgrade the most sensitive blocks one format step at a time while the budget allows.
* ``llamacpp_mix`` (a recipe, not a budget-filling search): no pruning, original top-k, every block in the type
  llama.cpp's standard mix gives it (``--mix Q4_K_M`` etc., :mod:`optimizer.llamacpp_mixes`); it fits the
  budget or it does not.

Each is a :class:`Baseline`, the :class:`~optimizer.solvers.base.Solver` interface of the MILP backends: it
declares that it is a heuristic (no bound, no gap), which constraints it honours (all but ``--min-tokens-per-s``;
a solve that sets that is refused) and whether its plan follows the objective; it reports how it stopped as a
:class:`~optimizer.solvers.base.Termination` (:attr:`BaselineRun.status`). They are registered with the backends
in :mod:`optimizer.solvers.registry`.

Under ``--target llamacpp`` format choices are made per (layer, projection) for all experts at once and
pruning removes the same number of experts from every layer, so the plans stay expressible.

Every baseline takes a ``deadline`` (a ``time.perf_counter()`` instant). Past it, a baseline that already
holds a plan stops upgrading and returns that plan (``complete=False``); one that does not yet hold a plan
returns none (``decisions=None, complete=False``), which is not the same as "cannot fit" (``complete=True``).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .errors import InputError
from .formats import get_format, same_bits_stand_in
from .formulation.decisions import Decisions
from .formulation.instance import Instance
from .llamacpp_mixes import check_mix, mix_types
from .plan import Target
from .solvers.base import Solver, Termination


@dataclass(frozen=True)
class BaselineOptions:
    retain_ratio: float = 0.75  # sequential: fraction of experts (and of top-k) kept, 192/256 in the paper
    importance_alpha: float = 0.5
    # uniform: this format only (blocks it cannot store take its same-bits stand-in or the next larger), not the
    # largest candidate format that fits
    uniform_format: str | None = None
    mix: str = "Q4_K_M"  # llamacpp_mix: llama.cpp's standard mix (optimizer.llamacpp_mixes.MIXES)


@dataclass(frozen=True, eq=False)
class BaselineRun:
    """A baseline's plan (``None``: no plan) and whether it ran to its end rather than to the deadline."""

    decisions: Decisions | None
    complete: bool = True
    # no plan fits: the baseline's own smallest plan, (its format, weight bytes with fixed tensors), if known
    smallest: tuple[str, int] | None = None

    @property
    def status(self) -> Termination:
        """``feasible`` with a plan (a heuristic proves nothing more), ``infeasible`` when its rules cannot fit the
        budget, ``no_solution`` when the deadline came before it held a plan."""
        if self.decisions is not None:
            return Termination.FEASIBLE
        return Termination.INFEASIBLE if self.complete else Termination.NO_SOLUTION


def _late(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() >= deadline


def _units(inst: Instance, present: np.ndarray) -> list[np.ndarray]:
    """Groups of present blocks that take one format together (llamacpp: all experts of a layer/projection)."""
    blocks = np.flatnonzero(present)
    if inst.options.target != Target.LLAMACPP:
        return [np.array([b]) for b in blocks]
    arch = inst.profile.architecture
    groups: dict[tuple, list[int]] = {}
    for b in blocks:
        blk = arch.blocks[b]
        key = (blk.layer, blk.projection) if blk.is_routed_expert else ("block", int(b))
        groups.setdefault(key, []).append(int(b))
    return [np.array(v) for v in groups.values()]


def _format_options(inst: Instance, unit: np.ndarray, lists: tuple[list, list, list],
                    ) -> dict[int, tuple[np.ndarray, int, float]]:
    """format index -> (pair per block of the unit, bytes, cost), for formats every block of the unit admits.

    ``lists``: ``pair_format``, ``pair_bytes``, ``pair_cost`` as Python lists (a one-block unit then costs
    no numpy call; the values are the same: a sum of one element is that element).
    """
    out: dict[int, tuple[np.ndarray, int, float]] = {}
    pf, pb, pc = lists
    per_block = [dict(zip(pf[inst.pairs_of(b).start:inst.pairs_of(b).stop],
                          range(inst.pairs_of(b).start, inst.pairs_of(b).stop)))
                 for b in unit.tolist()]
    common = set.intersection(*(set(d) for d in per_block))
    for f in common:
        if len(per_block) == 1:
            p = per_block[0][f]
            out[f] = (np.array([p]), pb[p], pc[p])
            continue
        pairs = np.array([d[f] for d in per_block])
        out[f] = (pairs, int(inst.pair_bytes[pairs].sum()), float(inst.pair_cost[pairs].sum()))
    return out


def _all_format_options(inst: Instance, units: list[np.ndarray], deadline: float | None,
                        ) -> list[dict[int, tuple[np.ndarray, int, float]]] | None:
    """:func:`_format_options` of every unit; ``None`` if ``deadline`` passes first."""
    lists = (inst.pair_format.tolist(), inst.pair_bytes.tolist(), inst.pair_cost.tolist())
    out = []
    for n, unit in enumerate(units):
        if n % 1024 == 0 and _late(deadline):
            return None
        out.append(_format_options(inst, unit, lists))
    return out


def _present(inst: Instance, keep: np.ndarray) -> np.ndarray:
    return inst.block_quantizable & ((inst.block_owner < 0) | keep[np.maximum(inst.block_owner, 0)])


def _assign(inst: Instance, keep: np.ndarray, choice: dict[int, int], units, options) -> np.ndarray:
    chosen = np.zeros(len(inst.pair_block), dtype=bool)
    for u, unit in enumerate(units):
        chosen[options[u][choice[u]][0]] = True
    return chosen


def _bytes(inst: Instance, keep: np.ndarray, chosen: np.ndarray) -> int:
    return int(inst.pair_bytes[chosen].sum() + inst.router_bytes[keep].sum())


def _uniform_choices(inst: Instance, keep: np.ndarray, deadline: float | None = None, only: int | None = None,
                     ) -> Iterator[tuple[int, np.ndarray] | None]:
    """Per format from the largest down (or format ``only``): every unit in it (else in its same-bits stand-in,
    :func:`~optimizer.formats.same_bits_stand_in`; else the next larger it admits), as (format, chosen pairs);
    stops early (``None``) when ``deadline`` passes."""
    units = _units(inst, _present(inst, keep))
    opts = _all_format_options(inst, units, deadline)
    if opts is None:
        yield None
        return
    order = sorted(range(len(inst.formats)), key=lambda f: -get_format(inst.formats[f]).bits_per_weight)
    order = order if only is None else [only]
    bpw = [get_format(f).bits_per_weight for f in inst.formats]
    index = {name: i for i, name in enumerate(inst.formats)}
    for f in order:
        if _late(deadline):
            yield None
            return
        choice = {}
        for u, o in enumerate(opts):
            same = same_bits_stand_in(inst.formats[f], [inst.formats[g] for g in o])
            bigger = [g for g in o if bpw[g] >= bpw[f]]
            if same is not None:
                choice[u] = index[same]
            elif bigger:
                choice[u] = min(bigger, key=lambda g: (bpw[g], g))
            else:
                choice[u] = max(o, key=lambda g: (bpw[g], -g))
        yield f, _assign(inst, keep, choice, units, opts)


def _largest_fitting(inst: Instance, keep: np.ndarray, top_k: np.ndarray, deadline: float | None = None,
                     only: int | None = None) -> BaselineRun:
    """Every unit in one format (or the next larger it admits), trying formats from the largest down (or only
    format ``only``)."""
    cap = inst.capacity
    sizes: list[tuple[int, str]] = []
    for option in _uniform_choices(inst, keep, deadline, only):
        if option is None:
            return BaselineRun(None, complete=False)
        nbytes = _bytes(inst, keep, option[1])
        if nbytes <= cap:
            return BaselineRun(Decisions(keep.copy(), top_k.copy(), option[1]))
        sizes.append((nbytes, inst.formats[option[0]]))
    nbytes, name = min(sizes)
    return BaselineRun(None, smallest=(name, nbytes + inst.fixed_bytes))


def _upgrade(inst: Instance, d: Decisions, by: str, deadline: float | None = None) -> BaselineRun:
    """Spend spare bytes on format upgrades with a heap over units.

    ``ratio``: along each unit's lower convex hull of (bytes, cost), best cost decrease per extra byte first
    (the classic multiple-choice-knapsack greedy). ``sensitivity``: the unit whose current format costs most
    moves one format step up, then is reconsidered. A step that does not fit is skipped. Past ``deadline``
    the upgrades made so far are kept (``complete=False``).
    """
    units = _units(inst, _present(inst, d.keep))
    opts = _all_format_options(inst, units, deadline)
    if opts is None:
        return BaselineRun(d, complete=False)
    left = inst.capacity - _bytes(inst, d.keep, d.chosen)
    chosen_pairs = set(np.flatnonzero(d.chosen).tolist())
    choice = {u: next(f for f, (pairs, _, _) in o.items() if int(pairs[0]) in chosen_pairs) for u, o in enumerate(opts)}
    heap: list[tuple[float, int, int]] = []

    def push(u: int) -> None:
        _, b0, c0 = opts[u][choice[u]]
        steps = sorted((b, c, f) for f, (_, b, c) in opts[u].items() if b > b0 and c < c0)
        if not steps:
            return
        if by == "ratio":
            b, c, f = max(steps, key=lambda s: ((c0 - s[1]) / (s[0] - b0), -s[0]))
            heapq.heappush(heap, (-(c0 - c) / (b - b0), u, f))
        else:
            heapq.heappush(heap, (-c0, u, steps[0][2]))

    for u in range(len(units)):
        push(u)
    complete = True
    while heap:
        if _late(deadline):
            complete = False
            break
        _, u, f = heapq.heappop(heap)
        delta = opts[u][f][1] - opts[u][choice[u]][1]
        if delta > left:
            continue
        choice[u] = f
        left -= delta
        push(u)
    return BaselineRun(Decisions(d.keep, d.top_k, _assign(inst, d.keep, choice, units, opts)), complete)


def uniform(inst: Instance, options: BaselineOptions | None = None, deadline: float | None = None) -> BaselineRun:
    keep = np.ones(inst.num_experts, dtype=bool)
    fmt = (options or BaselineOptions()).uniform_format
    only = None
    if fmt is not None:
        if fmt not in inst.formats:
            raise InputError(f"uniform format {fmt!r} is not among the candidate formats ({', '.join(inst.formats)})")
        only = inst.formats.index(fmt)
    return _largest_fitting(inst, keep, inst.layer_top_k.copy(), deadline, only)


def llamacpp_mix(inst: Instance, options: BaselineOptions | None = None,
                 deadline: float | None = None) -> BaselineRun:
    """Every expert kept at the original top-k, every block in the type llama.cpp's mix gives it.

    Raises :class:`InputError` when the mix uses types that are not candidate formats (it names them).
    """
    mix = check_mix((options or BaselineOptions()).mix)
    arch = inst.profile.architecture
    types = mix_types(arch, mix)
    keep = np.ones(inst.num_experts, dtype=bool)
    blocks = np.flatnonzero(_present(inst, keep)).tolist()
    missing = sorted({types[arch.blocks[b].name] for b in blocks} - set(inst.formats))
    if missing:
        raise InputError(f"llama.cpp mix {mix} uses {', '.join(missing)}, which "
                         f"{'is' if len(missing) == 1 else 'are'} not among the candidate formats "
                         f"({', '.join(inst.formats)}); add them to --formats (the profile needs their sensitivity)")
    index = {name: i for i, name in enumerate(inst.formats)}
    chosen = np.zeros(len(inst.pair_block), dtype=bool)
    for b in blocks:
        pairs = inst.pairs_of(b)
        hit = np.flatnonzero(inst.pair_format[pairs] == index[types[arch.blocks[b].name]])
        if not hit.size:  # the format was presolved away or cannot store the block
            raise InputError(f"llama.cpp mix {mix}: block {arch.blocks[b].name} has no candidate "
                             f"{types[arch.blocks[b].name]} (run the baseline without presolve)")
        chosen[pairs.start + int(hit[0])] = True
    nbytes = _bytes(inst, keep, chosen)
    if nbytes > inst.capacity:
        return BaselineRun(None, smallest=(f"llama.cpp {mix}", nbytes + inst.fixed_bytes))
    return BaselineRun(Decisions(keep, inst.layer_top_k.copy(), chosen))


def _importance(inst: Instance, alpha: float) -> np.ndarray:
    ex = inst.profile.experts
    parts = []
    for f, s in zip(ex.frequency, ex.mean_score):
        fn = f / f.sum() if f.sum() > 0 else np.full(len(f), 1 / len(f))
        sn = s / s.sum() if s.sum() > 0 else np.full(len(s), 1 / len(s))
        parts.append(alpha * fn + (1 - alpha) * sn)
    return np.concatenate(parts)


def _keep_top(inst: Instance, score: np.ndarray, per_group_keep: np.ndarray) -> np.ndarray:
    keep = np.zeros(inst.num_experts, dtype=bool)
    for i in range(len(inst.layer_top_k)):
        G = inst.groups
        ids = (inst.layer_first_expert[i] + np.arange(inst.layer_experts[i])).reshape(G, -1)
        for g in range(G):
            order = np.lexsort((ids[g], -score[ids[g]]))
            keep[ids[g][order[: per_group_keep[i]]]] = True
    return keep


def sequential(inst: Instance, options: BaselineOptions | None = None, deadline: float | None = None) -> BaselineRun:
    o = options or BaselineOptions()
    G = inst.groups
    per_group = inst.layer_experts // G
    m = np.array([max(math.ceil(o.retain_ratio * E / G), int(math.ceil(lo / G)),
                      math.ceil(inst.min_top_k / inst.topk_groups))
                  for E, lo in zip(inst.layer_experts, inst.layer_min_experts)])
    m = np.minimum(np.maximum(m, np.minimum(2, per_group) if G > 1 else 1), per_group)
    if inst.options.target == Target.LLAMACPP:
        m[:] = m.max()
    top_k = np.array([min(math.ceil(o.retain_ratio * K), inst.topk_groups * mi, G * mi)
                      for K, mi in zip(inst.layer_top_k, m)])
    top_k = np.maximum(top_k, inst.min_top_k)
    keep = _keep_top(inst, _importance(inst, o.importance_alpha), m)
    run = _largest_fitting(inst, keep, top_k, deadline)
    return run if run.decisions is None else _upgrade(inst, run.decisions, "sensitivity", deadline)


def greedy(inst: Instance, options: BaselineOptions | None = None, deadline: float | None = None) -> BaselineRun:
    """Value per byte over two kinds of items, from the smallest plan up.

    Start with the fewest experts each layer needs at its original top-k (highest drop cost per byte
    first), every block in its smallest format. Items: *add an expert slice* (one expert per group; value =
    drop cost avoided minus its blocks' cost at their smallest formats) and *upgrade a block's format*
    (value = cost decrease). Take the item with the largest value per byte that fits, until none does.
    Under ``--target llamacpp`` experts are added to every layer at once.
    """
    all_units = _units(inst, _present(inst, np.ones(inst.num_experts, dtype=bool)))
    all_opts = _all_format_options(inst, all_units, deadline)
    if all_opts is None:
        return BaselineRun(None, complete=False)
    g = _Greedy(inst, all_units, all_opts)
    if g.bytes_now() > g.cap:
        return BaselineRun(None)
    if inst.options.target == Target.LLAMACPP:
        # formats per (layer, projection) change with the expert count: add experts first, then upgrade
        complete = g.add_expert_slices(deadline)
        run = _upgrade(inst, Decisions(g.keep, g.top_k, g.base_chosen()), "ratio", deadline)
        return BaselineRun(run.decisions, complete and run.complete)
    complete = g.run_heap(deadline)
    return BaselineRun(g.decisions(), complete)


class _Greedy:
    """The state of :func:`greedy`: kept experts (ranked per group by value per byte) and a format per unit."""

    def __init__(self, inst: Instance, all_units: list[np.ndarray], all_opts: list[dict]):
        G = inst.groups
        self.inst, self.all_units, self.all_opts = inst, all_units, all_opts
        self.llama = inst.options.target == Target.LLAMACPP
        self.cap = inst.capacity
        self.top_k = top_k = inst.layer_top_k.copy()
        keep_all = np.ones(inst.num_experts, dtype=bool)
        self.smallest = {u: min(o, key=lambda f: (o[f][1], o[f][2])) for u, o in enumerate(all_opts)}
        self.base = base = _assign(inst, keep_all, self.smallest, all_units, all_opts)
        self.own = own = inst.block_owner[inst.pair_block]
        size = np.bincount(own[base & (own >= 0)], weights=inst.pair_bytes[base & (own >= 0)],
                           minlength=inst.num_experts)
        block_cost = np.bincount(own[base & (own >= 0)], weights=inst.pair_cost[base & (own >= 0)],
                                 minlength=inst.num_experts)
        self.size = size = size + inst.router_bytes
        self.value = value = inst.drop_cost - block_cost  # what keeping an expert (at its smallest formats) is worth
        order_key = value / np.maximum(size, 1)
        self.n_layers = n_layers = len(inst.layer_top_k)
        ids = [(inst.layer_first_expert[i] + np.arange(inst.layer_experts[i])).reshape(G, -1) for i in range(n_layers)]
        self.ranked = [[ids[i][g][np.lexsort((ids[i][g], -order_key[ids[i][g]]))] for g in range(G)]
                       for i in range(n_layers)]
        self.per_group = per_group = inst.layer_experts // G
        need = np.array([max(math.ceil(max(inst.layer_min_experts[i], top_k[i]) / G),
                             math.ceil(top_k[i] / inst.topk_groups), min(2, per_group[i]) if G > 1 else 0)
                         for i in range(n_layers)])
        if self.llama:
            need[:] = need.max()
        self.count = need.copy()
        self.keep = np.zeros(inst.num_experts, dtype=bool)
        for i in range(n_layers):
            for g in range(G):
                self.keep[self.ranked[i][g][: self.count[i]]] = True

    def base_chosen(self) -> np.ndarray:
        return self.base & ((self.own < 0) | self.keep[np.maximum(self.own, 0)])

    def bytes_now(self) -> int:
        return _bytes(self.inst, self.keep, self.base_chosen())

    def slice_of(self, i: int) -> list[int]:
        G = self.inst.groups
        return [int(self.ranked[i][g][self.count[i]]) for g in range(G)] if self.count[i] < self.per_group[i] else []

    def expert_item(self, i: int) -> tuple[float, int, list[int]] | None:
        layers = range(self.n_layers) if self.llama else [i]
        members = [e for j in layers for e in self.slice_of(j)]
        if not members or len(members) < self.inst.groups * len(layers):
            return None
        return float(self.value[members].sum()), int(self.size[members].sum()), members

    def add_expert_slices(self, deadline: float | None) -> bool:
        """llamacpp: add a slice to every layer while it is worth its bytes; ``False`` if stopped by ``deadline``."""
        while True:
            if _late(deadline):
                return False
            item = self.expert_item(0)
            if item is None or item[0] <= 0 or self.bytes_now() + item[1] > self.cap:
                return True
            self.keep[item[2]] = True
            self.count += 1

    def run_heap(self, deadline: float | None) -> bool:
        """hf: take expert slices and format upgrades, best value per byte first; ``False`` if stopped by
        ``deadline``."""
        inst, all_opts = self.inst, self.all_opts
        left = self.cap - self.bytes_now()
        self.choice = choice = dict(self.smallest)
        unit_of_block = {int(u[0]): k for k, u in enumerate(self.all_units)}
        # (-value per byte, kind 0 = upgrade / 1 = expert, unit or layer, format)
        heap: list[tuple[float, int, int, int]] = []

        def push_upgrade(u: int) -> None:
            _, b0, c0 = all_opts[u][choice[u]]
            steps = [(b, c, f) for f, (_, b, c) in all_opts[u].items() if b > b0 and c < c0]
            if steps:
                b, c, f = max(steps, key=lambda s: ((c0 - s[1]) / (s[0] - b0), -s[0]))
                heapq.heappush(heap, (-(c0 - c) / (b - b0), 0, u, f))

        def push_expert(i: int) -> None:
            item = self.expert_item(i)
            if item is not None and item[0] > 0:
                heapq.heappush(heap, (-item[0] / max(item[1], 1), 1, i, -1))

        expert_blocks = np.flatnonzero(inst.block_owner >= 0)
        expert_blocks = expert_blocks[np.argsort(inst.block_owner[expert_blocks], kind="stable")]
        block_start = np.searchsorted(inst.block_owner[expert_blocks], np.arange(inst.num_experts + 1))
        for b in np.flatnonzero(_present(inst, self.keep)):
            push_upgrade(unit_of_block[int(b)])
        for i in range(self.n_layers):
            push_expert(i)
        while heap:
            if _late(deadline):
                return False
            _, kind, u, f = heapq.heappop(heap)
            if kind == 0:
                delta = all_opts[u][f][1] - all_opts[u][choice[u]][1]
                if delta <= left:
                    choice[u], left = f, left - delta
                    push_upgrade(u)
                continue
            item = self.expert_item(u)
            if item is None or item[1] > left:
                continue
            self.keep[item[2]] = True
            self.count[u] += 1
            left -= item[1]
            for e in item[2]:
                for b in expert_blocks[block_start[e]:block_start[e + 1]]:
                    push_upgrade(unit_of_block[int(b)])
            push_expert(u)
        return True

    def decisions(self) -> Decisions:
        """The plan of the current state (every present unit in its chosen format)."""
        present = _present(self.inst, self.keep)
        chosen = np.zeros(len(self.inst.pair_block), dtype=bool)
        for k, unit in enumerate(self.all_units):
            if present[unit[0]]:
                chosen[self.all_opts[k][self.choice[k]][0]] = True
        return Decisions(self.keep, self.top_k, chosen)


class Baseline(Solver):
    """A heuristic behind the solver interface: fixed rules on the instance, no bound, no gap."""

    proves_bound = False
    presolve = False  # baselines reason about every format
    #: every constraint but the decode speed: a baseline never looks at bytes read per token
    honours = frozenset({"budget", "target", "min_experts", "min_top_k"})
    #: a recipe has one plan of fixed size: it cannot trade bytes for quality under a budget
    recipe: ClassVar[bool] = False

    @staticmethod
    def rule(inst: Instance, options: BaselineOptions | None, deadline: float | None) -> BaselineRun:
        """The module-level function that makes the plan (each baseline sets its own)."""
        raise NotImplementedError

    def run(self, inst: Instance, options: BaselineOptions | None = None, deadline: float | None = None,
            ) -> BaselineRun:
        """The baseline's plan of ``inst``, stopping at ``deadline`` (a ``time.perf_counter()`` instant);
        :class:`InputError` for options it cannot follow."""
        return type(self).rule(inst, options, deadline)


class Uniform(Baseline):
    name = "uniform"
    description = "no pruning, original top-k, every block in the largest single format that fits"
    follows_objective = False
    rule = staticmethod(uniform)


class Greedy(Baseline):
    name = "greedy"
    description = "value per byte: expert slices and format upgrades, best cost decrease per byte first"
    rule = staticmethod(greedy)


class Sequential(Baseline):
    name = "sequential"
    description = "CC-MoE's recipe: keep the top experts by importance, k = ceil(r K), then upgrade formats"
    rule = staticmethod(sequential)


class LlamacppMix(Baseline):
    name = "llamacpp_mix"
    description = "llama-quantize's standard mix (--mix): every expert, original top-k; fits the budget or not"
    follows_objective = False
    recipe = True
    rule = staticmethod(llamacpp_mix)


#: Every baseline by name, in the order the CLI lists them.
BASELINE_CLASSES: dict[str, type[Baseline]] = {cls.name: cls for cls in (Uniform, Greedy, Sequential, LlamacppMix)}
BASELINES = tuple(name for name, cls in BASELINE_CLASSES.items() if not cls.recipe)
#: Baselines with a fixed size (a recipe): they cannot trade bytes for quality under a budget.
RECIPES = tuple(name for name, cls in BASELINE_CLASSES.items() if cls.recipe)
ALL_BASELINES = BASELINES + RECIPES


def run_baseline_until(name: str, inst: Instance, options: BaselineOptions | None = None,
                       deadline: float | None = None) -> BaselineRun:
    """Run a baseline by name until it ends or ``deadline`` (a ``time.perf_counter()`` instant) passes."""
    return BASELINE_CLASSES[name]().run(inst, options, deadline)


def run_baseline(name: str, inst: Instance, options: BaselineOptions | None = None) -> Decisions | None:
    """Run a baseline by name, without a deadline; ``None`` when it cannot fit the budget."""
    return run_baseline_until(name, inst, options).decisions
