"""Prune curves: the measured cost of pruning several experts of a layer together, priced by the count term
g_i(n) of :mod:`optimizer.formulation.objectives` in the MILP (family (6)), the Lagrangian decomposition and
every plan's objective; the profile field ``experts.prune_curve`` round-trips and is validated.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from optimizer.budget import Budget
from optimizer.errors import InputError
from optimizer.formulation.constraints import build_milp
from optimizer.formulation.decisions import check_decisions
from optimizer.formulation.decomposition import lagrangian
from optimizer.formulation.instance import FormulationOptions, build_instance
from optimizer.formulation.objectives import ObjectiveOptions, build_objective
from optimizer.profile import Measurement, Profile, PruneCurve, load_profile, profile_to_json, save_profile
from optimizer.solve import SolveOptions
from optimizer.synthetic import synthetic_profile
from tests.optimizer.test_formulation import (
    EXACT,
    PL,
    SMALL,
    budget_at,
    expert_formats,
    hand_profile,
    kept,
    solve_checked,
)

CURVE = Measurement("hand-made prune curve", prior=True)


def with_curves(p: Profile, curves: list[PruneCurve | None]) -> Profile:
    return dataclasses.replace(p, experts=dataclasses.replace(p.experts, prune_curve=tuple(curves),
                                                              prune_curve_measurement=CURVE))


def curve(order, counts, cost) -> PruneCurve:
    return PruneCurve(np.array(order), np.array(counts), np.array(cost, float))


# CASE D, pruning two together costs more than their singles. One layer, 4 experts, top-2; drops (0.02, 0.03,
# 0.40, 0.50); Q4_0 costs (0.10, 0.10, 0.10, 0.12), Q8_0 costs 0; top-k costs (k=1: 1.0, k=2: 0); budget 70.
# Four kept experts need >= 72 bytes, so at least one goes.
#   3 kept (drop e0: 0.02), 54 bytes in Q4_0 + one 16-byte upgrade (e3 saves the most): 0.02 + 0.10 + 0.10 = 0.22
#   2 kept (drop e0, e1: 0.05), both Q8_0 (68 bytes): 0.05                <- optimum by single costs
# The curve (order e0, e1, e2, e3) measured C(1) = 0.02 and C(2) = 0.30:
#   x(1) = 0.02 - S(1) - topk(k=2) = 0.02 - 0.02 - 0 = 0;  x(2) = 0.30 - (0.02 + 0.03) - 0 = 0.25
#   g = (0, 0, 0.25, 0.25, 0.25) for n = 0..4 (constant past the last measured count)
#   2 kept: 0.05 + 0.25 = 0.30 > 0.22: the curve keeps three experts.        <- optimum with the curve
CASE_D = [dict(drop=[0.02, 0.03, 0.40, 0.50], sens=[[0.10, 0], [0.10, 0], [0.10, 0], [0.12, 0]], topk=[1.0, 0.0])]
CURVE_D = curve([0, 1, 2, 3], [1, 2], [0.02, 0.30])


@pytest.mark.parametrize("accelerate", [True, False])
def test_hand_curve_keeps_an_expert_the_singles_would_prune(accelerate: bool) -> None:
    so = dataclasses.replace(EXACT, accelerate=accelerate)
    p = with_curves(hand_profile(CASE_D), [CURVE_D])
    fo = FormulationOptions(objective=PL)
    np.testing.assert_allclose(build_objective(p, PL).prune_count[0], [0, 0, 0.25, 0.25, 0.25], atol=1e-15)
    plan = solve_checked(p, Budget(70, {}), fo, so)
    assert kept(plan) == (1, 2, 3) and plan.layers[0].top_k == 2
    assert expert_formats(plan) == {1: "Q4_0", 2: "Q4_0", 3: "Q8_0"}
    assert plan.solve.objective == pytest.approx(0.22, abs=1e-12)
    off = FormulationOptions(objective=PL, objective_options=ObjectiveOptions(prune_curve=False))
    plan = solve_checked(p, Budget(70, {}), off, so)
    assert kept(plan) == (2, 3) and expert_formats(plan) == {2: "Q8_0", 3: "Q8_0"}
    assert plan.solve.objective == pytest.approx(0.05, abs=1e-12)


# CASE E, the curve prices the top-k that pruning forces; the cost is interpolated, not the excess. Same layer;
# curve C(3) = 0.20 (three pruned, the layer routes to 1). C is interpolated through C(0) = 0, C(1) = S(1) +
# topk(k=2) = 0.02 (the cheapest single) and C(3) = 0.20, so C(2) = 0.11, and g(n) = C(n) - S(n) - topk(k(n)):
# g(1) = 0.02 - 0.02 - 0 = 0; g(2) = 0.11 - 0.05 - 0 = 0.06; g(3) = 0.20 - 0.45 - 1.0 = -1.25; g(4) = g(3)
# (past the last count). Interpolating the excess x(3) = -1.25 instead gave g(2) = -0.83, clamped to -0.05:
# two pruned priced at 0, the k = 1 jump of n = 3 leaking into n = 2.
def test_count_term_interpolates_the_cost_and_subtracts_forced_top_k() -> None:
    p = with_curves(hand_profile(CASE_D), [curve([0, 1, 2, 3], [3], [0.20])])
    np.testing.assert_allclose(build_objective(p, PL).prune_count[0], [0, 0, 0.06, -1.25, -1.25], atol=1e-12)
    # Budget 36 = two Q4_0 experts or one Q8_0. One kept (e3 in Q8_0, k = 1) is priced at its measurement:
    # 0.45 + 1.0 - 1.25 = 0.20. Two kept (e2, e3 in Q4_0, k = 2): 0.05 + 0.06 + 0.10 + 0.12 = 0.33. Optimum 0.20.
    plan = solve_checked(p, Budget(36, {}), FormulationOptions(objective=PL))
    assert kept(plan) == (3,) and plan.layers[0].top_k == 1
    assert plan.solve.objective == pytest.approx(0.20, abs=1e-12)


def random_curves(p: Profile, seed: int) -> Profile:
    """Curves in every other layer: random orders (balanced over groups), counts and super-additive costs."""
    rng = np.random.default_rng(seed)
    G = p.architecture.expert_groups
    curves: list[PruneCurve | None] = []
    for i, m in enumerate(p.architecture.moe_layers):
        if i % 2:
            curves.append(None)
            continue
        size = m.num_experts // G
        ranks = np.array([rng.permutation(size) + g * size for g in range(G)])  # [G, size]
        order = ranks.T.ravel()  # round robin over groups: every prefix of a multiple of G is balanced
        counts = np.arange(G, m.num_experts, G)[: 3]
        cost = np.sort(rng.uniform(0.01, 0.5, len(counts))) * (1 + np.arange(len(counts)))
        curves.append(PruneCurve(order, counts, cost))
    return with_curves(p, curves)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("arch_kw,frac", [({}, 0.1), ({}, 0.4), ({"groups": 2, "topk_groups": 1, "top_k": 3}, 0.15)])
def test_lagrangian_and_milp_agree_with_curves(seed: int, arch_kw: dict, frac: float) -> None:
    p = random_curves(synthetic_profile(seed=seed, **{**SMALL, **arch_kw}), seed)
    fo = FormulationOptions(objective=PL)
    budget = budget_at(p, frac, fo)
    inst = build_instance(p, budget, fo)
    assert inst.prune_count_cost is not None
    model, v = build_milp(inst)
    lr = lagrangian(inst, rel_gap=1e-4)
    assert lr is not None and check_decisions(inst, model, v, lr.decisions) == []
    assert lr.objective == pytest.approx(lr.decisions.objective(inst), rel=1e-12)
    milp = solve_checked(p, budget, fo, SolveOptions(time_limit=30, rel_gap=1e-9, accelerate=False))
    opt = milp.solve.objective
    assert lr.bound <= opt + 1e-9 * abs(opt) + 1e-12  # weak duality holds with the count term
    assert opt <= lr.objective + 1e-9 * abs(opt) + 1e-12


def test_llamacpp_target_prices_the_count() -> None:
    p = random_curves(synthetic_profile(seed=4, **SMALL), 4)
    fo = FormulationOptions(objective=PL, target="llamacpp")
    solve_checked(p, budget_at(p, 0.2, fo), fo)


# ------------------------------------------------------------------------------------------ profile field
def test_profile_round_trip_keeps_curves(tmp_path) -> None:
    p = with_curves(hand_profile(CASE_D + CASE_D), [CURVE_D, None])
    save_profile(p, tmp_path / "p.json")
    back = load_profile(tmp_path / "p.json")
    c = back.experts.prune_curve
    assert c[1] is None and c[0].order.tolist() == [0, 1, 2, 3] and c[0].counts.tolist() == [1, 2]
    assert c[0].cost.tolist() == [0.02, 0.30]
    assert back.experts.prune_curve_measurement == CURVE
    assert profile_to_json(back) == profile_to_json(p)


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(order=[0, 1, 1, 3]), "each of the layer's 4 experts once"),
    (lambda c: c.update(order=[0, 1, 2]), "each of the layer's 4 experts once"),
    (lambda c: c.update(order=[0, 1, 2, 4]), r"order\[3\]"),
    (lambda c: c.update(counts=[2, 1]), "strictly ascending"),
    (lambda c: c.update(counts=[1, 4]), r"counts\[1\]"),
    (lambda c: c.update(counts=[]), "strictly ascending"),
    (lambda c: c.update(cost=[0.1]), "expected 2"),
    (lambda c: c.update(cost=[0.1, -1.0]), r"cost\[1\]"),
])
def test_invalid_curves_are_refused(tmp_path, edit, match: str) -> None:
    doc = profile_to_json(with_curves(hand_profile(CASE_D), [CURVE_D]))
    edit(doc["experts"]["prune_curve"][0])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match=match):
        load_profile(path)


def test_grouped_curve_must_prune_groups_equally(tmp_path) -> None:
    p = hand_profile([dict(drop=[0.1] * 4, sens=[[0.0, 0.0]] * 4, topk=[1.0, 0.0])], groups=2)
    doc = profile_to_json(with_curves(p, [curve([0, 2, 1, 3], [2], [0.3])]))
    path = tmp_path / "ok.json"
    path.write_text(json.dumps(doc))
    load_profile(path)  # e0 from group 0, e2 from group 1: balanced
    doc["experts"]["prune_curve"][0]["order"] = [0, 1, 2, 3]
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="spread equally"):
        load_profile(path)
    del doc["experts"]["prune_curve_measurement"]
    doc["experts"]["prune_curve"][0]["order"] = [0, 2, 1, 3]
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="prune_curve_measurement: required"):
        load_profile(path)


def test_validate_predicts_with_the_count_term() -> None:
    """CASE D's plan {e2, e3} in Q8_0 at k = 2: singles 0.02 + 0.03, formats 0, top-k 0, count term g(2) = 0.25."""
    from profiling.validate import _term_tables, predict
    from tests.optimizer.test_formulation import expert_block

    p = with_curves(hand_profile(CASE_D), [CURVE_D])
    plan = {"pruned": {0: [0, 1]}, "top_k": {0: 2}, "formats": {expert_block(0, 2): "Q8_0", expert_block(0, 3): "Q8_0"}}
    assert predict(p, plan, _term_tables(p, None)["profile"]) == pytest.approx(0.30, abs=1e-12)
    assert predict(p, plan, _term_tables(hand_profile(CASE_D), None)["profile"]) == pytest.approx(0.05, abs=1e-12)
