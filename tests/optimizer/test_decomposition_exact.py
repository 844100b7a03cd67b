"""Exact values of optimizer/formulation/decomposition.py on hand-made instances: the precomputed per-layer tables
of the relaxation, L(lam) and its minimiser at given multipliers, the fewest bytes (hf and llama.cpp), the
bisection's path (every multiplier it tries, by hand), the deadline and the "nothing fits" cases.

The decomposition reads only arrays of the instance, so the instances here are ``SimpleNamespace`` stand-ins
with every byte and cost chosen by hand (the formulation tests check it on real instances against the MILP).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from optimizer.formulation.decomposition import (
    _expert_min_bytes,
    _Relaxation,
    _smallest_plan,
    applicable,
    lagrangian,
    min_weight_bytes,
    segment_minima,
)
from optimizer.plan import Target


def _inst(blocks, layers=(), *, capacity: int, groups: int = 1, topk_groups: int = 1, min_top_k: int = 1,
          router=None, prune=None, target: Target = Target.HF, fixed_bytes: int = 0) -> SimpleNamespace:
    """``blocks``: (owner expert or -1, [(bytes, cost), ...]); no pairs = a non-quantizable block.
    ``layers``: dicts with E, K, min (experts), topk (cost of k = 1..K), drop (per expert)."""
    E = np.array([ly["E"] for ly in layers], dtype=np.int64)
    pairs = [p for _, ps in blocks for p in ps]
    ptr = np.concatenate([[0], np.cumsum([len(ps) for _, ps in blocks])]).astype(np.int64)
    drop = np.array([c for ly in layers for c in ly["drop"]], dtype=float)
    return SimpleNamespace(
        layer_experts=E, layer_top_k=np.array([ly["K"] for ly in layers], dtype=np.int64),
        layer_min_experts=np.array([ly["min"] for ly in layers], dtype=np.int64),
        layer_first_expert=np.concatenate([[0], np.cumsum(E)[:-1]]).astype(np.int64) if len(E) else E,
        topk_cost=tuple(np.array(ly["topk"], dtype=float) for ly in layers),
        min_top_k=min_top_k, groups=groups, topk_groups=topk_groups,
        expert_layer=np.repeat(np.arange(len(E)), E), num_experts=int(E.sum()), drop_cost=drop,
        router_bytes=np.array(router if router is not None else [0] * int(E.sum()), dtype=np.int64),
        block_owner=np.array([o for o, _ in blocks], dtype=np.int64),
        block_quantizable=np.array([len(ps) > 0 for _, ps in blocks]),
        pair_block=np.array([b for b, (_, ps) in enumerate(blocks) for _ in ps], dtype=np.int64),
        pair_bytes=np.array([nb for nb, _ in pairs], dtype=np.int64),
        pair_cost=np.array([c for _, c in pairs], dtype=float),
        pair_ptr=ptr, capacity=capacity, fixed_bytes=fixed_bytes, prune_count_cost=prune,
        options=SimpleNamespace(target=target, min_tokens_per_s=None),
    )


def _chosen(d) -> list[int]:
    return np.flatnonzero(d.chosen).tolist()


# ------------------------------------------------------------------------------------------------ applicable
def test_applicable_only_for_hf_without_speed() -> None:
    def opts(target, speed):
        return SimpleNamespace(options=SimpleNamespace(target=target, min_tokens_per_s=speed))
    assert applicable(opts(Target.HF, None)) is True
    assert applicable(opts(Target.LLAMACPP, None)) is False
    assert applicable(opts(Target.HF, 5.0)) is False
    assert applicable(opts(Target.LLAMACPP, 5.0)) is False


# ------------------------------------------------------------------------------------------------ segment_minima
def test_segment_minima_takes_the_first_pair_of_a_tie() -> None:
    # block 0: pairs 0..2 with values 3, 1, 1 (tie: pair 1 first); block 1: 5, 2, 2 (pair 4); block 2: one pair
    pv = np.array([3.0, 1.0, 1.0, 5.0, 2.0, 2.0, 0.0])
    minv, first = segment_minima(pv, np.array([0, 3, 6]))
    assert minv.tolist() == [1.0, 2.0, 0.0] and first.tolist() == [1, 4, 6]
    # a minimum in the last pair of a block, and a block of one pair in the middle
    minv, first = segment_minima(np.array([4.0, 2.0, 7.0, 1.0, 9.0]), np.array([0, 2, 3]))
    assert minv.tolist() == [2.0, 7.0, 1.0] and first.tolist() == [1, 2, 3]


# ------------------------------------------------------------------------------------------------ layer tables
def _grouped(topk_groups: int = 1, min_top_k: int = 1, min_experts: int = 1, K: int = 3):
    # one layer of 6 experts in 2 groups of 3, one block (one pair) per expert
    blocks = [(g, [(10, 0.0)]) for g in range(6)]
    layer = {"E": 6, "K": K, "min": min_experts, "topk": [0.5, 0.3, 0.2][:K], "drop": [1.0] * 6}
    prune = (np.array([0.0, 0.1, 0.4, 0.9, 1.6, 2.5, 3.6]),)  # g(n) for n = 0..6 experts pruned
    return _inst(blocks, [layer], capacity=100, groups=2, topk_groups=topk_groups, min_top_k=min_top_k, prune=prune)


def test_relaxation_tables_with_groups() -> None:
    relax = _Relaxation(_grouped())
    ids, ms, value, best_k = relax.layers[0]
    assert ids.tolist() == [[0, 1, 2], [3, 4, 5]]
    # m_lo = max(ceil(1 / 2), min(2, 3)) = 2 experts per group, up to 3: m = 2, 3
    assert ms.tolist() == [2, 3]
    # k <= min(K 3, topk_groups 1 * m, groups 2 * m) = 2, 3; best top-k cost for k <= 2 is 0.3 (k = 2), for
    # k <= 3 0.2 (k = 3); plus g(6 - 2 m) = g(2) = 0.4, g(0) = 0
    assert value.tolist() == pytest.approx([0.3 + 0.4, 0.2 + 0.0]) and best_k.tolist() == [2, 3]
    assert relax.q_blocks.tolist() == list(range(6)) and relax.starts.tolist() == list(range(6))
    assert relax.owner.tolist() == list(range(6)) and relax.expert_mask.all() and relax.cap == 100


def test_relaxation_tables_topk_groups_and_min_top_k() -> None:
    # two groups may be selected: k <= min(3, 2 m, 2 m) = 3 for m = 2 and 3
    _, ms, value, best_k = _Relaxation(_grouped(topk_groups=2)).layers[0]
    assert ms.tolist() == [2, 3] and value.tolist() == pytest.approx([0.2 + 0.4, 0.2]) and best_k.tolist() == [3, 3]
    # --min-top-k 3 with one selected group: m = 2 allows only k <= 2 and is dropped; k = 3 costs 0.2
    _, ms, value, best_k = _Relaxation(_grouped(min_top_k=3, min_experts=3)).layers[0]
    assert ms.tolist() == [3] and value.tolist() == pytest.approx([0.2]) and best_k.tolist() == [3]
    # at least 5 experts: ceil(5 / 2) = 3 per group
    _, ms, _, _ = _Relaxation(_grouped(min_experts=5)).layers[0]
    assert ms.tolist() == [3]


def test_relaxation_tables_without_groups() -> None:
    # one group of 3 experts, K = 2: m from 1 (the minimum, no group floor) to 3; k <= min(2, m)
    blocks = [(g, [(10, 0.0)]) for g in range(3)]
    layer = {"E": 3, "K": 2, "min": 1, "topk": [0.4, 0.6], "drop": [1.0] * 3}
    ids, ms, value, best_k = _Relaxation(_inst(blocks, [layer], capacity=100)).layers[0]
    assert ids.tolist() == [[0, 1, 2]] and ms.tolist() == [1, 2, 3]
    # k = 2 costs more than k = 1, so the best k <= 2 is k = 1 (0.4) for every m
    assert value.tolist() == pytest.approx([0.4, 0.4, 0.4]) and best_k.tolist() == [1, 1, 1]
    # the floor of 2 experts per group applies only with groups: 2 here
    layer = {"E": 3, "K": 2, "min": 2, "topk": [0.4, 0.6], "drop": [1.0] * 3}
    _, ms, _, _ = _Relaxation(_inst(blocks, [layer], capacity=100)).layers[0]
    assert ms.tolist() == [2, 3]


# ------------------------------------------------------------------------------------------------ solve
# Two MoE layers. Block 0 belongs to no expert; block 3 is not quantizable (no pairs).
#   layer 0: experts 0, 1 (blocks 1, 2), top-2, top-k costs k=1 0.3, k=2 0.1, drop costs 4.0, 1.0, router 2 B each
#   layer 1: experts 2, 3 (blocks 4, 5), top-1, top-k cost 0.05, drop costs 0.5, 2.0, router 3 B each
# pairs (bytes, cost):
#   block 0: p0 (10, 2.0)  p1 (20, 0.5)    block 1: p2 (18, 1.0)  p3 (34, 0.0)    block 2: p4 (18, 3.0)  p5 (34, 0.2)
#   block 4: p6 (18, 0.4)  p7 (34, 0.1)    block 5: p8 (18, 0.6)  p9 (34, 0.3)
BLOCKS = [(-1, [(10, 2.0), (20, 0.5)]), (0, [(18, 1.0), (34, 0.0)]), (1, [(18, 3.0), (34, 0.2)]), (-1, []),
          (2, [(18, 0.4), (34, 0.1)]), (3, [(18, 0.6), (34, 0.3)])]


def _two_layers(min1: int = 1, **kw) -> SimpleNamespace:
    layers = [{"E": 2, "K": 2, "min": 1, "topk": [0.3, 0.1], "drop": [4.0, 1.0]},
              {"E": 2, "K": 1, "min": min1, "topk": [0.05], "drop": [0.5, 2.0]}]
    return _inst(BLOCKS, layers, capacity=70, router=[2, 2, 3, 3], **kw)


def test_solve_at_zero_keeps_everything_at_its_best_format() -> None:
    value, d, nbytes = _Relaxation(_two_layers()).solve(0.0)
    # every block at its cheapest pair (p1, p3, p5, p7, p9), every expert kept (dropping costs more), layer 0 at
    # k = 2 (0.1 < 0.3); objective 0.5 + 0 + 0.2 + 0.1 + 0.3 + 0.1 + 0.05 = 1.25
    assert _chosen(d) == [1, 3, 5, 7, 9] and d.keep.tolist() == [True] * 4 and d.top_k.tolist() == [2, 1]
    assert nbytes == 20 + 34 + 34 + 34 + 34 + (2 + 2 + 3 + 3) == 166 and type(nbytes) is int
    assert value == pytest.approx(1.25)


def test_solve_at_a_quarter_by_hand() -> None:
    inst = _two_layers()
    value, d, nbytes = _Relaxation(inst).solve(0.25)
    # pair values cost + bytes / 4: p0 4.5 p1 5.5 | p2 5.5 p3 8.5 | p4 7.5 p5 8.7 | p6 4.9 p7 8.6 | p8 5.1 p9 8.8
    # layer 0: keep - drop = 5.5 + 0.5 - 4 = 2.0 (expert 0), 7.5 + 0.5 - 1 = 7.0 (expert 1): one expert (2.0 + 0.3)
    #   beats two (9.0 + 0.1); layer 1: 4.9 + 0.75 - 0.5 = 5.15, 5.1 + 0.75 - 2 = 3.85: keep expert 3 only
    assert d.keep.tolist() == [True, False, False, True] and d.top_k.tolist() == [1, 1]
    assert _chosen(d) == [0, 2, 8]
    assert nbytes == 10 + 18 + 18 + 2 + 3 == 51
    # L = objective + lam (bytes - cap): drops 1.0 + 0.5, formats 2.0 + 1.0 + 0.6, top-k 0.3 + 0.05 = 5.45;
    # 5.45 + 0.25 * (51 - 70) = 0.7
    assert d.objective(inst) == pytest.approx(5.45)
    assert value == pytest.approx(0.7)


def test_solve_keeps_the_cheaper_expert_whichever_it_is() -> None:
    inst = _two_layers()
    inst.drop_cost = np.array([1.0, 4.0, 0.5, 2.0])  # layer 0's drop costs swapped
    value, d, nbytes = _Relaxation(inst).solve(0.25)
    # layer 0: 5.5 + 0.5 - 1 = 5.0 (expert 0), 7.5 + 0.5 - 4 = 4.0 (expert 1): expert 1 kept, at p4
    assert d.keep.tolist() == [False, True, False, True] and _chosen(d) == [0, 4, 8] and nbytes == 51
    # drops 1.0 + 0.5, formats 2.0 + 3.0 + 0.6, top-k 0.35: 7.45; 7.45 - 0.25 * 19 = 2.7
    assert value == pytest.approx(2.7)


def test_solve_without_costs_counts_bytes() -> None:
    value, d, nbytes = _Relaxation(_two_layers()).solve(1.0, cost_weight=0.0)
    # the fewest bytes: smallest pairs, one expert a layer (ties: the first), k = 1: 10 + 18 + 18 + 2 + 3 = 51
    assert d.keep.tolist() == [True, False, True, False] and _chosen(d) == [0, 2, 6] and d.top_k.tolist() == [1, 1]
    assert nbytes == 51 and value == pytest.approx(51 - 70)


# ------------------------------------------------------------------------------------------------ fewest bytes
def test_expert_min_bytes_by_hand() -> None:
    got = _expert_min_bytes(_two_layers())
    # smallest pair of each expert's block (18) plus its router rows (2, 2, 3, 3)
    assert got.tolist() == [20, 20, 21, 21] and got.dtype == np.int64


def test_min_weight_bytes_hf_and_llamacpp() -> None:
    # hf: 51 (see above) + 7 fixed bytes
    assert min_weight_bytes(_two_layers(fixed_bytes=7)) == 58
    # layer 1 must keep both its experts: 10 + 18 + 2 (layer 0) + 2 * (18 + 3) (layer 1) = 72, + 7 fixed
    assert min_weight_bytes(_two_layers(min1=2, fixed_bytes=7)) == 79
    # llama.cpp: every layer keeps as many experts as the most demanding one (2): layer 0 adds expert 1 (20 B)
    got = min_weight_bytes(_two_layers(min1=2, fixed_bytes=7, target=Target.LLAMACPP))
    assert got == 99 and type(got) is int
    # with one expert a layer everywhere nothing is added
    assert min_weight_bytes(_two_layers(fixed_bytes=7, target=Target.LLAMACPP)) == 58


def test_min_weight_bytes_llamacpp_adds_the_smallest_experts() -> None:
    # layer 0: three experts of 18, 50 and 26 bytes (one pair each; no router), at least 1 kept;
    # layer 1: two experts of 10 bytes, both kept (min 2). llama.cpp: layer 0 keeps 2 too, the two smallest
    blocks = [(0, [(18, 0.0)]), (1, [(50, 0.0)]), (2, [(26, 0.0)]), (3, [(10, 0.0)]), (4, [(10, 0.0)])]
    layers = [{"E": 3, "K": 1, "min": 1, "topk": [0.0], "drop": [0.0] * 3},
              {"E": 2, "K": 1, "min": 2, "topk": [0.0], "drop": [0.0] * 2}]
    hf = _inst(blocks, layers, capacity=1000)
    assert min_weight_bytes(hf) == 18 + 20
    ll = _inst(blocks, layers, capacity=1000, target=Target.LLAMACPP)
    assert min_weight_bytes(ll) == 18 + 26 + 20


# ------------------------------------------------------------------------------------------------ lagrangian
# Two blocks A and B of no expert, each with pairs (10 B, cost 1.0) and (20 B, cost 0.0); one MoE layer of one
# expert that owns no block and costs nothing (it is always kept, at k = 1).
# L(lam) = 2 min(1 + 10 lam, 20 lam) - cap lam.  With cap 30: L = 10 lam below lam = 0.1, 2 - 10 lam above;
# the best plan (one block upgraded, 30 bytes) costs 1.0 = max L (at lam = 0.1).
def _ab(cap: int) -> SimpleNamespace:
    layer = {"E": 1, "K": 1, "min": 1, "topk": [0.0], "drop": [0.0]}
    return _inst([(-1, [(10, 1.0), (20, 0.0)]), (-1, [(10, 1.0), (20, 0.0)])], [layer], capacity=cap)


def test_lagrangian_bisection_path_by_hand() -> None:
    # lam = 0: 40 B > 30. scale = (|costs| 2.0 + drops 0) / cap 30 = 1/15: 40 B again (L = 2/3); 8/15: 20 B fit
    # (L < 0), spare 10 B upgrade block A: objective 1.0. Then geometric bisection between 1/15 and 8/15:
    # sqrt(8)/15 fits, 8^(1/4)/15 fits (L = 2 - 10 lam = 0.879), 8^(1/8)/15 does not (L = 0.865),
    # 8^(3/16)/15 does not (L = 10 lam = 0.985): gap 0.015 <= rel_gap / 4 = 0.1, stop after 7 evaluations
    r = lagrangian(_ab(30), rel_gap=0.4)
    assert r.evaluations == 7 and r.stopped is False
    assert r.objective == pytest.approx(1.0) and r.decisions.objective(_ab(30)) == pytest.approx(1.0)
    assert _chosen(r.decisions) == [1, 2]  # block A upgraded (first of two equal upgrades), block B small
    assert r.bound == pytest.approx(10 * 8 ** (3 / 16) / 15, rel=1e-12)
    assert r.multiplier == pytest.approx(8 ** 0.25 / 15, rel=1e-12)
    assert r.gap == pytest.approx(1 - 10 * 8 ** (3 / 16) / 15, rel=1e-9)


def test_lagrangian_stops_at_max_evaluations() -> None:
    # the same path, cut after 5 evaluations: the best bound is L(8^(1/4)/15) = 2 - 10 * 8^(1/4)/15
    r = lagrangian(_ab(30), rel_gap=0.4, max_evaluations=5)
    assert r.evaluations == 5 and r.stopped is False and r.objective == pytest.approx(1.0)
    assert r.bound == pytest.approx(2 - 10 * 8 ** 0.25 / 15, rel=1e-12)
    assert r.multiplier == pytest.approx(8 ** 0.25 / 15, rel=1e-12)


def test_lagrangian_default_gap_converges_to_the_optimum() -> None:
    r = lagrangian(_ab(30))
    # optimum 1.0 = max L: the bound approaches it from below (within rel_gap / 4 = 2.5e-5, or the multiplier
    # interval shrinks to nothing, or 60 evaluations)
    assert r.objective == pytest.approx(1.0) and r.bound <= 1.0 and r.bound == pytest.approx(1.0, abs=1e-3)
    assert 7 < r.evaluations <= 60 and r.multiplier == pytest.approx(0.1, rel=1e-3) and r.multiplier >= 0.1


def test_lagrangian_exact_fits() -> None:
    # cap 40: the unconstrained plan (both upgraded, cost 0) fits at lam = 0: one evaluation
    r = lagrangian(_ab(40))
    assert (r.evaluations, r.objective, r.bound, r.multiplier, r.stopped) == (1, 0.0, 0.0, 0.0, False)
    assert _chosen(r.decisions) == [1, 3]
    # cap 20: scale = 2.0 / 20 = 0.1; at lam = 0.1 both pairs of a block tie (1 + 1 = 0 + 2): the first (10 B)
    # is taken, 20 B fit exactly, L(0.1) = 4 - 2 = 2.0 = the objective: the gap is 0, two evaluations
    r = lagrangian(_ab(20))
    assert (r.evaluations, r.objective, r.bound, r.stopped) == (2, 2.0, 2.0, False)
    assert r.multiplier == pytest.approx(0.1) and _chosen(r.decisions) == [0, 2]


def test_lagrangian_nothing_fits() -> None:
    # the smallest plan needs 20 bytes: with 19 no multiplier finds a plan (81 evaluations), the answer is None
    assert lagrangian(_ab(19)) is None
    assert lagrangian(_ab(19), deadline=-math.inf) is None
    assert _smallest_plan(_ab(19), _Relaxation(_ab(19))) is None


def test_lagrangian_past_deadline_takes_the_smallest_plan() -> None:
    # the deadline has passed before the search: only lam = 0 was evaluated (40 B, L = 0); the smallest plan
    # (20 B) fits and spends its 10 spare bytes on block A: objective 1.0, bound min(L(0), 1.0) = 0
    r = lagrangian(_ab(30), rel_gap=0.4, deadline=-math.inf)
    assert (r.evaluations, r.objective, r.bound, r.multiplier, r.stopped) == (1, 1.0, 0.0, 0.0, True)
    assert _chosen(r.decisions) == [1, 2]
    # a deadline far ahead changes nothing
    import time

    r = lagrangian(_ab(30), rel_gap=0.4, deadline=time.perf_counter() + 3600.0)
    assert r.evaluations == 7 and r.stopped is False


def test_smallest_plan_by_hand() -> None:
    obj, d = _smallest_plan(_ab(30), _Relaxation(_ab(30)))
    assert obj == 1.0 and _chosen(d) == [1, 2]  # 20 B + one 10 B upgrade
    obj, d = _smallest_plan(_ab(20), _Relaxation(_ab(20)))
    assert obj == 2.0 and _chosen(d) == [0, 2]  # exactly the smallest plan, nothing to spend
    obj, d = _smallest_plan(_ab(45), _Relaxation(_ab(45)))
    assert obj == 0.0 and _chosen(d) == [1, 3]  # 40 B: both upgraded


def test_lagrangian_with_experts_fits_and_bounds() -> None:
    inst = _two_layers()
    r = lagrangian(inst)
    # the plan fits the 70 bytes, its objective is its own, and the bound is below it
    keep, chosen = r.decisions.keep, r.decisions.chosen
    nbytes = int(inst.pair_bytes[chosen].sum() + inst.router_bytes[keep].sum())
    assert nbytes <= 70 and r.objective == pytest.approx(r.decisions.objective(inst))
    assert r.bound <= r.objective + 1e-12 and r.multiplier > 0


def test_lagrangian_plan_that_fits_exactly_at_zero() -> None:
    # capacity 166 = the bytes of the unconstrained plan (see test_solve_at_zero...): it is taken as it is, with
    # every expert kept (the smallest plan would drop one expert a layer)
    inst = _two_layers()
    inst.capacity = 166
    r = lagrangian(inst)
    assert (r.evaluations, r.multiplier, r.stopped) == (1, 0.0, False)
    assert r.objective == pytest.approx(1.25) and r.bound == pytest.approx(1.25)
    assert r.decisions.keep.tolist() == [True] * 4 and _chosen(r.decisions) == [1, 3, 5, 7, 9]


def _scaled(cost_a: float = 1.0, cost_c: float = 100.0, drop: float = 4.0) -> SimpleNamespace:
    # blocks A, B: (10 B, cost_a) or (20 B, 0); block C: one pair (1 B, cost_c); one expert (drop cost `drop`) that
    # owns no block and is always kept. Capacity 31: the 21-byte smallest plan plus one upgrade
    layer = {"E": 1, "K": 1, "min": 1, "topk": [0.0], "drop": [drop]}
    ab = [(-1, [(10, cost_a), (20, 0.0)]), (-1, [(10, cost_a), (20, 0.0)])]
    return _inst(ab + [(-1, [(1, cost_c)])], [layer], capacity=31)


def test_lagrangian_first_multiplier_is_the_cost_scale() -> None:
    # scale = (|costs| 1 + 1 + 100 + drops 4) / capacity 31 = 106/31; at that multiplier A and B take 10 B
    # (1 + 10 * 3.4 < 20 * 3.4): the plan fits at once. Objective: A at 10 B (1.0), B upgraded, C 100: 101;
    # bound L(0) = 100 (everything at its cheapest, 41 B)
    r = lagrangian(_scaled(), max_evaluations=2)
    assert r.evaluations == 2 and r.multiplier == pytest.approx(106 / 31, rel=1e-12)
    assert r.objective == pytest.approx(101.0) and r.bound == pytest.approx(100.0)
    # the next multiplier (nothing below it was tried) is an eighth of it: it fits too
    r = lagrangian(_scaled(), max_evaluations=3)
    assert r.evaluations == 3 and r.multiplier == pytest.approx(106 / 31 / 8, rel=1e-12)
    # gap (101 - 100) / 101 = 0.0099 <= rel_gap / 4 = 0.0125: stop right after the first plan that fits
    r = lagrangian(_scaled(), rel_gap=0.05)
    assert r.evaluations == 2 and r.multiplier == pytest.approx(106 / 31, rel=1e-12)
    # costs below 1 in all: scale = (0.25 + 0.25 + 0.4) / 31, which still fits (0.25 + 10 s <= 20 s)
    r = lagrangian(_scaled(cost_a=0.25, cost_c=0.4, drop=0.0), max_evaluations=2)
    assert r.multiplier == pytest.approx(0.9 / 31, rel=1e-12) and r.objective == pytest.approx(0.65)


def test_lagrangian_relative_gap_below_one() -> None:
    # s = 0.9 / 31: objective 0.65, bound L(s) = 2 (0.25 + 10 s) + 0.4 + s - 31 s = 0.9 - 10 s = 0.6097; the
    # relative gap (0.65 - 0.6097) / 0.65 = 0.062 > rel_gap / 4 = 0.05, so the search goes on after the first plan
    # that fits (dividing by max(|0.65|, 1) instead would give 0.040 and stop)
    r = lagrangian(_scaled(cost_a=0.25, cost_c=0.4, drop=0.0), rel_gap=0.2)
    assert r.evaluations > 2 and r.objective == pytest.approx(0.65)


def test_lagrangian_one_byte_capacity() -> None:
    # one block (1 B, cost 1.0) or (2 B, cost 0), capacity 1: scale = 1.0 / max(1, 1) = 1; there both pairs tie
    # (1 + 1 = 0 + 2), the first (1 B) fits exactly: L(1) = 2 - 1 = 1 = the objective, two evaluations
    layer = {"E": 1, "K": 1, "min": 1, "topk": [0.0], "drop": [0.0]}
    r = lagrangian(_inst([(-1, [(1, 1.0), (2, 0.0)])], [layer], capacity=1))
    assert (r.evaluations, r.multiplier, r.objective, r.bound) == (2, 1.0, 1.0, 1.0)


def test_lagrangian_rel_gap_threshold_is_a_quarter() -> None:
    # the bisection path of test_lagrangian_bisection_path_by_hand with rel_gap 0.5: after 5 evaluations the gap
    # is 1 - (2 - 10 * 8^(1/4) / 15) = 0.1212 <= 0.5 / 4 = 0.125: stop there (a fifth would go on to 7)
    r = lagrangian(_ab(30), rel_gap=0.5)
    assert r.evaluations == 5 and r.multiplier == pytest.approx(8 ** 0.25 / 15, rel=1e-12)
    assert r.bound == pytest.approx(2 - 10 * 8 ** 0.25 / 15, rel=1e-12)


def _one_block(cap: int, fixed_drop: float = 0.0) -> SimpleNamespace:
    layer = {"E": 1, "K": 1, "min": 1, "topk": [0.0], "drop": [fixed_drop]}
    return _inst([(-1, [(10, 1.0), (20, 0.0)])], [layer], capacity=cap)


def test_lagrangian_stops_when_the_interval_vanishes() -> None:
    # one block (10 B, 1.0) / (20 B, 0), capacity 15: only the 10-byte plan fits (objective 1), max L = L(0.1) = 0.5:
    # the gap never closes. The bisection starts on [1/15, 8/15] (ratio 8); each step takes the square root of the
    # ratio, which falls to 1 + 1e-15 after 51 steps (2^51 > ln 8 / 1e-15 > 2^50): 3 + 51 = 54 evaluations
    r = lagrangian(_one_block(15))
    assert r.evaluations == 54 and r.objective == 1.0
    assert r.bound == pytest.approx(0.5, abs=1e-9) and r.multiplier == pytest.approx(0.1, rel=1e-9)


def test_lagrangian_stops_at_sixty_evaluations_by_default() -> None:
    # an always-kept expert with drop cost 1e7 makes the first multiplier huge: (1 + 1e7) / 15 = 666,666.7 fits,
    # and so do its 1/8 ... 1/8^7 (0.32 > 0.1); 1/8^8 (0.04) does not: 2 + 8 evaluations, then 51 bisections would
    # be needed: the default limit of 60 evaluations stops first
    r = lagrangian(_one_block(15, fixed_drop=1e7))
    assert r.evaluations == 60 and r.objective == 1.0 and r.bound == pytest.approx(0.5, abs=1e-6)


def test_lagrangian_deadline_by_a_fake_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    import optimizer.formulation.decomposition as dec

    class Clock:  # 10, 11, 12, ... one second per reading
        t = 9.0

        def __call__(self) -> float:
            self.t += 1.0
            return self.t

    # readings: t0 = 10; first loop 11 (lam 1/15), 12 (lam 8/15: fits); bisection 13. A deadline of 13 is reached
    # exactly there (>=): 3 evaluations, the plan of lam 8/15, bound L(1/15) = 2/3, stopped; seconds 14 - 10
    monkeypatch.setattr(dec.time, "perf_counter", Clock())
    r = lagrangian(_ab(30), rel_gap=0.4, deadline=13.0)
    assert (r.evaluations, r.stopped, r.objective) == (3, True, 1.0) and _chosen(r.decisions) == [1, 2]
    assert r.bound == pytest.approx(2 / 3) and r.multiplier == pytest.approx(8 / 15) and r.seconds == 4.0
    # a deadline of 11 is reached at the first reading of the first loop: only lam = 0 was evaluated, the smallest
    # plan is taken
    monkeypatch.setattr(dec.time, "perf_counter", Clock())
    r = lagrangian(_ab(30), rel_gap=0.4, deadline=11.0)
    assert (r.evaluations, r.stopped, r.objective, r.bound, r.multiplier) == (1, True, 1.0, 0.0, 0.0)


def test_solve_breaks_ties_by_expert_id() -> None:
    # 40 experts without blocks, router rows of 2, 1, 2, 1, ... bytes; at least 5 kept. Counting bytes only, the
    # five cheapest are five of the twenty 1-byte experts: the first five of them (a stable sort), ids 1, 3, 5, 7, 9
    layer = {"E": 40, "K": 5, "min": 5, "topk": [0.0] * 5, "drop": [0.0] * 40}
    inst = _inst([(-1, [(1, 0.0)])], [layer], capacity=100, router=[2, 1] * 20)
    _, d, nbytes = _Relaxation(inst).solve(1.0, cost_weight=0.0)
    assert np.flatnonzero(d.keep).tolist() == [1, 3, 5, 7, 9] and nbytes == 1 + 5
    assert d.top_k.tolist() == [1]  # no k costs anything: the smallest


def test_fewest_bytes_ignore_costs() -> None:
    # block 0: (10 B, cost 100) or (20 B, cost 0): the fewest bytes take 10 B whatever it costs; counting costs in
    # would take 20 B. The smallest plan with capacity 10 is that plan (objective 100), and nothing fits in 9
    layer = {"E": 1, "K": 1, "min": 1, "topk": [0.0], "drop": [0.0]}
    inst = _inst([(-1, [(10, 100.0), (20, 0.0)])], [layer], capacity=10)
    assert min_weight_bytes(inst) == 10
    obj, d = _smallest_plan(inst, _Relaxation(inst))
    assert obj == 100.0 and _chosen(d) == [0]
    inst.capacity = 9
    assert _smallest_plan(inst, _Relaxation(inst)) is None


# ------------------------------------------------------------------------------------------------ spend_leftover
def _spend(pairs: list[list[tuple[int, float]]], chosen: list[int], left: int) -> tuple[list[int], int]:
    """Blocks as lists of (bytes, cost) pairs, ``chosen`` pairs (global index), ``left`` spare bytes: the pairs
    chosen after spending, and the bytes spent."""
    from optimizer.formulation.decisions import Decisions
    from optimizer.formulation.decomposition import spend_leftover

    inst = _inst([(-1, ps) for ps in pairs], capacity=0)
    mask = np.zeros(len(inst.pair_bytes), dtype=bool)
    mask[chosen] = True
    nbytes = int(inst.pair_bytes[mask].sum())
    d, spent = spend_leftover(inst, Decisions(np.zeros(0, bool), np.zeros(0, int), mask), nbytes, nbytes + left)
    return _chosen(d), spent - nbytes


def test_spend_leftover_ranks_a_one_byte_upgrade_by_its_full_ratio() -> None:
    # block 0: 10 B at 5.0 -> 11 B at 4.0 (1 byte for 1.0: ratio 1.0); block 1: 10 B at 5.0 -> 12 B at 3.6
    # (2 bytes for 1.4: ratio 0.7). With 2 spare bytes the better ratio (block 0) goes first, then block 1's
    # 2 bytes no longer fit
    assert _spend([[(10, 5.0), (11, 4.0)], [(10, 5.0), (12, 3.6)]], [0, 2], 2) == ([1, 2], 1)


def test_spend_leftover_prefers_the_larger_decrease_at_equal_ratio() -> None:
    # block 0: 10 B at 5.0 -> 12 B at 4.0 (ratio 0.5); block 1: 10 B at 5.0 -> 12 B at 4.0 (p3, ratio 0.5, dc 1)
    # or 14 B at 3.0 (p4, ratio 0.5, dc 2): each block takes one upgrade, block 1 the larger decrease (p4)
    pairs = [[(10, 5.0), (12, 4.0)], [(10, 5.0), (12, 4.0), (14, 3.0)]]
    assert _spend(pairs, [0, 2], 100) == ([1, 4], 2 + 4)
    # across blocks at equal ratio the larger decrease goes first: 4 spare bytes buy block 1's p4 (dc 2) and then
    # block 0's 2 bytes do not fit
    assert _spend(pairs, [0, 2], 4) == ([0, 4], 4)
