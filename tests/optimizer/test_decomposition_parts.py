"""Hand-computed checks that kill the surviving mutants of optimizer/formulation/decomposition.py.

``spend_leftover`` and ``_expert_min_bytes`` only read a few arrays of the instance, so they get small
hand-made stand-ins (``SimpleNamespace``) with every byte and cost chosen by hand. ``min_weight_bytes`` and
``_smallest_plan`` run on a real one-layer instance: two experts of one [1, 32] ``down_proj`` row each, which
costs 18 bytes in Q4_0 and 34 bytes in Q8_0 (ggml: one 32-element block of 18 / 34 bytes).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from optimizer.budget import Budget
from optimizer.formulation.decisions import Decisions
from optimizer.formulation.decomposition import (
    _expert_min_bytes,
    _Relaxation,
    _smallest_plan,
    min_weight_bytes,
    spend_leftover,
)
from optimizer.formulation.instance import FormulationOptions, build_instance
from optimizer.model_spec import Architecture, Block, BlockKind, KVCacheSpec, MoELayer
from optimizer.profile import Device, ExpertStats, Measurement, ModelInfo, Profile, Sensitivity, TopkCost

HAND = Measurement("hand-made test profile", prior=True)


# ------------------------------------------------------------------------------------------ spend_leftover
def _inst(pairs: list[list[tuple[int, float]]], owner: list[int] | None = None) -> SimpleNamespace:
    """Blocks given as lists of (bytes, cost) pairs, in block order."""
    return SimpleNamespace(
        block_owner=np.array(owner if owner is not None else [-1] * len(pairs)),
        pair_block=np.array([b for b, ps in enumerate(pairs) for _ in ps]),
        pair_bytes=np.array([nb for ps in pairs for nb, _ in ps], dtype=np.int64),
        pair_cost=np.array([c for ps in pairs for _, c in ps], dtype=float),
    )


def _dec(chosen: list[int], n_pairs: int) -> Decisions:
    mask = np.zeros(n_pairs, dtype=bool)
    mask[chosen] = True
    return Decisions(np.zeros(0, dtype=bool), np.zeros(0, dtype=int), mask)


def _chosen(d: Decisions) -> list[int]:
    return np.flatnonzero(d.chosen).tolist()


def test_spend_leftover_upgrades_pair_zero_when_the_bytes_fit_exactly() -> None:
    # one block: pair 0 (18 B, cost 1.0) chosen, pair 1 (34 B, cost 0.5): dc = 0.5, db = 34 - 18 = 16
    inst = _inst([[(18, 1.0), (34, 0.5)]])
    d, nbytes = spend_leftover(inst, _dec([0], 2), 18, 18 + 16)  # left = 16 = db exactly
    assert _chosen(d) == [1] and nbytes == 34
    d, nbytes = spend_leftover(inst, _dec([0], 2), 18, 18 + 15)  # left = 15 < 16: nothing fits
    assert _chosen(d) == [0] and nbytes == 18


def test_spend_leftover_never_downgrades_or_moves_sideways() -> None:
    # block 0: chosen pair 1 (18 B, cost 1.0); pair 0 is smaller and worse (10 B, 2.0): dc = -1, db = -8;
    # pair 2 costs the same and is bigger (30 B, 1.0): dc = 0, db = 12; pair 3 the same and smaller (12 B, 1.0)
    inst = _inst([[(10, 2.0), (18, 1.0), (30, 1.0), (12, 1.0)]])
    d0 = _dec([1], 4)
    d, nbytes = spend_leftover(inst, d0, 18, 1000)
    assert d is d0 and nbytes == 18


def test_spend_leftover_takes_small_cost_decreases() -> None:
    # dc = 1.0 - 0.75 = 0.25 (< 1, still an upgrade), db = 34 - 18 = 16
    inst = _inst([[(18, 1.0), (34, 0.75)]])
    d, nbytes = spend_leftover(inst, _dec([0], 2), 18, 100)
    assert _chosen(d) == [1] and nbytes == 34


def test_spend_leftover_best_ratio_first() -> None:
    # block 0: dc = 1, db = 2 (ratio 0.5); block 1: dc = 2, db = 10 (ratio 0.2). left = 10: the better ratio
    # goes first (left 10 - 2 = 8), then block 1's 10 bytes no longer fit
    inst = _inst([[(10, 3.0), (12, 2.0)], [(10, 5.0), (20, 3.0)]])
    d, nbytes = spend_leftover(inst, _dec([0, 2], 4), 20, 30)
    assert _chosen(d) == [1, 2] and nbytes == 22


def test_spend_leftover_free_upgrade_beats_any_ratio() -> None:
    # one block, chosen pair 0 (10 B, cost 5.0). Pair 1: same bytes, dc = 0.1 (db = 0: ratio inf);
    # pair 2: dc = 3, db = 4 (ratio 0.75). The free upgrade wins, whatever its cost decrease
    inst = _inst([[(10, 5.0), (10, 4.9), (14, 2.0)]])
    d, nbytes = spend_leftover(inst, _dec([0], 3), 10, 100)
    assert _chosen(d) == [1] and nbytes == 10
    # a smaller upgrade (db < 0) is also free: pair 1 has 8 B and dc = 0.1; nbytes 10 -> 8
    inst = _inst([[(10, 5.0), (8, 4.9), (14, 2.0)]])
    d, nbytes = spend_leftover(inst, _dec([0], 3), 10, 100)
    assert _chosen(d) == [1] and nbytes == 8


def test_spend_leftover_one_byte_upgrade_has_a_finite_ratio() -> None:
    # chosen pair 0 (10 B, 5.0); pair 1: db = 1, dc = 0.1 (ratio 0.1); pair 2: db = 4, dc = 3 (ratio 0.75):
    # the better ratio (pair 2) is the block's candidate
    inst = _inst([[(10, 5.0), (11, 4.9), (14, 2.0)]])
    d, nbytes = spend_leftover(inst, _dec([0], 3), 10, 100)
    assert _chosen(d) == [2] and nbytes == 14


def test_spend_leftover_leaves_absent_blocks_and_immovable_blocks_alone() -> None:
    # block 0 (present, chosen pair 0), block 1 (a pruned expert's block: no pair chosen; its pair 3 would be
    # "better" than the last pair 4 of block 2), block 2 (present, chosen pair 4, nothing to upgrade)
    inst = _inst([[(18, 1.0), (34, 0.5)], [(18, 0.0), (34, 0.0)], [(50, 9.0)]], owner=[-1, 0, -1])
    d0 = _dec([0, 4], 5)
    d, nbytes = spend_leftover(inst, d0, 68, 1000)
    assert _chosen(d) == [1, 4] and nbytes == 68 + 16  # only block 0 moves: 18 -> 34
    # block 0 not movable: nothing changes
    movable = np.array([False, True, True])
    d, nbytes = spend_leftover(inst, d0, 68, 1000, movable=movable)
    assert _chosen(d) == [0, 4] and nbytes == 68


# ---------------------------------------------------------------------------------------- _expert_min_bytes
def test_expert_min_bytes() -> None:
    # block 0 belongs to no expert; block 1 to expert 0 (min of 18, 34); block 2 to expert 1 (min of 40, 30);
    # block 3 is not quantizable; expert 2 owns no quantizable block. Router bytes 4 per expert
    inst = SimpleNamespace(
        block_quantizable=np.array([True, True, True, False]),
        block_owner=np.array([-1, 0, 1, 2]),
        pair_bytes=np.array([10, 20, 18, 34, 40, 30], dtype=np.int64),
        pair_ptr=np.array([0, 2, 4, 6, 6]),
        num_experts=3,
        router_bytes=np.array([4, 4, 4], dtype=np.int64),
    )
    got = _expert_min_bytes(inst)
    assert got.dtype == np.int64
    assert got.tolist() == [18 + 4, 30 + 4, 0 + 4]


# ------------------------------------------------------------------ min_weight_bytes and _smallest_plan
def _profile() -> Profile:
    """One MoE layer of 2 experts (top-2), formats Q4_0 / Q8_0. Q4_0 costs 1000 per expert and Q8_0 nothing;
    dropping an expert costs 5; every top-k costs 0."""
    formats = ("Q4_0", "Q8_0")
    blocks = tuple(Block(f"model.layers.0.mlp.experts.{e}.down_proj.weight", BlockKind.ROUTED_EXPERT, (1, 32), 0,
                         e, "down_proj") for e in range(2))
    arch = Architecture(family="hand", num_layers=1, hidden_size=32, vocab_size=32, moe_layers=(MoELayer(0, 2, 2),),
                        shared_experts=0, blocks=blocks, kv_cache=KVCacheSpec("gqa", 2, 1),
                        expert_projections=("down_proj",))
    half = (np.full(2, 0.5),)
    experts = ExpertStats(half, half, half, half, (np.array([5.0, 5.0]),), HAND, HAND)
    return Profile(ModelInfo("hand"), arch, formats, experts,
                   Sensitivity(formats, np.array([[1000.0, 0.0], [1000.0, 0.0]]), HAND),
                   TopkCost((np.array([0.0, 0.0]),), HAND), Device(1e9, HAND))


FO = FormulationOptions(objective="predicted_loss")


def _instance(available: int):
    return build_instance(_profile(), Budget(available, {}), FO)


def test_hand_instance_costs() -> None:
    inst = _instance(1000)
    assert inst.pair_bytes.tolist() == [18, 34, 18, 34] and inst.pair_cost.tolist() == [1000.0, 0.0, 1000.0, 0.0]
    assert inst.fixed_bytes == 0 and inst.capacity == 1000


def test_min_weight_bytes_ignores_costs() -> None:
    # fewest bytes: keep one expert (top-1) in Q4_0 = 18 B (no fixed tensors, no router). Weighting the costs
    # in would pick Q8_0 (1000 + 18 > 0 + 34) and give 34
    assert min_weight_bytes(_instance(1000)) == 18


def test_smallest_plan_at_exactly_its_bytes() -> None:
    inst = _instance(18)  # capacity 18 = the smallest plan: it fits, with no bytes left to spend
    obj, d = _smallest_plan(inst, _Relaxation(inst))
    # expert 0 kept in Q4_0 (1000), expert 1 dropped (5), top-1 (0)
    assert obj == 1005.0
    assert d.keep.tolist() == [True, False] and d.top_k.tolist() == [1] and d.chosen.tolist() == [True] + [False] * 3
    assert _smallest_plan(_instance(17), _Relaxation(_instance(17))) is None


def test_smallest_plan_spends_spare_bytes() -> None:
    inst = _instance(34)  # 16 spare bytes: expert 0 upgrades Q4_0 -> Q8_0 (db = 34 - 18 = 16, dc = 1000)
    obj, d = _smallest_plan(inst, _Relaxation(inst))
    assert obj == pytest.approx(5.0)  # drop expert 1 (5) + Q8_0 (0) + top-1 (0)
    assert d.keep.tolist() == [True, False] and d.chosen.tolist() == [False, True, False, False]
