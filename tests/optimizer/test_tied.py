"""The exact ``--target llamacpp`` search (optimizer/formulation/tied.py): a hand case whose plan and knapsack
bound are derived below, its plan and bound against the MILP's proven optimum on synthetic instances, and the
DeepSeek-V3 example certified without a backend."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from optimizer.budget import make_budget
from optimizer.formulation.constraints import build_milp
from optimizer.formulation.decisions import check_decisions
from optimizer.formulation.instance import FormulationOptions, build_instance
from optimizer.formulation.tied import applicable, tied_exact
from optimizer.plan import Target
from optimizer.profile import load_profile
from optimizer.solve import SolveOptions, optimize
from optimizer.synthetic import synthetic_profile
from tests.optimizer.test_formulation import CASE_A, CASE_A_BUDGET, PL, SMALL, budget_at, hand_profile, speed_profile

LLAMACPP = FormulationOptions(objective=PL, target=Target.LLAMACPP)


# CASE A (test_formulation.py): one layer of 4 experts (drop 0.50, 0.40, 0.30, 0.20), one block each,
# Q4_0 18 bytes (costs 0.01..0.04) or Q8_0 34 bytes (cost 0), a 4-byte router row per kept expert, top-k costs
# (k=1: 1.0, k=2: 0); 82 bytes for the decisions.
#   m = 4: at least 4 * 22 = 88 > 82 bytes: cannot fit.
#   m = 3 (k = 2): keep e0..e2. Q4_0: 1.40 - 1.20 + 0.06 = 0.26 in 66 bytes; Q8_0: 0.20 in 114 bytes. The knapsack
#          bound takes a third of the step to Q8_0 (66 + 48/3 = 82): 0.26 - 0.06/3 = 0.24.
#   m = 2 (k = 2): Q8_0 {e0, e1}: 0.50 in 76 bytes (Q4_0: 0.53 in 44).    m = 1 (k = 1): >= 1.0.
# Plan: m = 3, all Q4_0, 0.26 (the MILP's optimum, test_formulation.py); bound min(0.24, 0.50, 1.9) = 0.24.
def test_hand_case_plan_and_knapsack_bound() -> None:
    inst = build_instance(hand_profile(CASE_A, router=True, norm=True), CASE_A_BUDGET, LLAMACPP)
    assert inst.capacity == 82 and applicable(inst)
    r = tied_exact(inst)
    assert r is not None and not r.stopped
    assert r.experts_per_group == 3 and r.decisions.keep.tolist() == [True, True, True, False]
    assert r.decisions.top_k.tolist() == [2]
    assert [inst.formats[f] for f in inst.pair_format[r.decisions.chosen]] == ["Q4_0"] * 3
    assert r.objective == pytest.approx(0.26, abs=1e-12)
    assert r.bound == pytest.approx(0.24, abs=1e-9)
    assert r.gap == pytest.approx(0.02 / 0.26, abs=1e-8)


def test_applicable_to_the_llamacpp_target_with_or_without_a_speed_floor() -> None:
    p = hand_profile(CASE_A, router=True, norm=True)
    assert not applicable(build_instance(p, CASE_A_BUDGET, FormulationOptions(objective=PL)))
    assert not applicable(build_instance(p, CASE_A_BUDGET, FormulationOptions(objective=PL, min_tokens_per_s=1.0)))
    assert applicable(build_instance(p, CASE_A_BUDGET, dataclasses.replace(LLAMACPP, min_tokens_per_s=1.0)))


@pytest.mark.parametrize("seed,arch,frac", [
    (1, {}, 0.1), (2, {}, 0.4), (3, {"groups": 2, "topk_groups": 1, "top_k": 3}, 0.2),
    (4, {"groups": 4, "topk_groups": 2, "top_k": 4}, 0.1), (5, {}, 0.7), (6, {"num_layers": 6}, 0.3),
])
def test_plan_and_bound_bracket_the_milp_optimum(seed: int, arch: dict, frac: float) -> None:
    p = synthetic_profile(seed=seed, **{**SMALL, **arch})
    fo = FormulationOptions(target=Target.LLAMACPP)
    budget = budget_at(p, frac, fo)
    inst = build_instance(p, budget, fo)
    r = tied_exact(inst)
    assert r is not None
    model, v = build_milp(inst)
    assert check_decisions(inst, model, v, r.decisions) == []
    assert r.objective == r.decisions.objective(inst)
    best = optimize(p, budget, fo, SolveOptions(time_limit=60, rel_gap=1e-9, accelerate=False)).solve
    assert best.status.value == "optimal"
    assert r.bound <= best.objective + 1e-12 <= r.objective + 2e-12
    # the solve starts from this plan and bound, and the MILP closes what the knapsack bound leaves open
    accelerated = optimize(p, budget, fo, SolveOptions(time_limit=60, rel_gap=1e-9)).solve
    assert accelerated.objective == pytest.approx(best.objective, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("arch", [{}, {"groups": 2, "topk_groups": 1, "top_k": 3}])
@pytest.mark.parametrize("faster", [0.9, 0.6])
def test_speed_floor_plan_and_bound_bracket_the_milp_optimum(arch: dict, faster: float) -> None:
    """Under --min-tokens-per-s every (m, k) is searched with both rows priced; the plan meets the read row
    exactly as the MILP computes it (check_decisions) and the bound is below the MILP's proven optimum."""
    from optimizer.formulation.speed import plan_read

    p = speed_profile(**arch)
    fo = FormulationOptions(target=Target.LLAMACPP)
    budget = budget_at(p, 0.5, fo)
    free = tied_exact(build_instance(p, budget, fo))
    assert free is not None
    base = build_instance(p, budget, fo)
    floor = p.device.tokens_per_s(plan_read(base, free.decisions) * faster + base.fixed_read_per_token)
    fo_speed = dataclasses.replace(fo, min_tokens_per_s=floor)
    inst = build_instance(p, budget, fo_speed)
    r = tied_exact(inst)
    assert r is not None
    model, v = build_milp(inst)
    assert check_decisions(inst, model, v, r.decisions) == []
    assert plan_read(inst, r.decisions) <= inst.read_limit
    assert r.objective >= free.objective - 1e-12  # a floor that binds costs something
    best = optimize(p, budget, fo_speed, SolveOptions(time_limit=60, rel_gap=1e-9, accelerate=False)).solve
    assert best.status.value == "optimal"
    assert r.bound <= best.objective + 1e-12 <= r.objective + 2e-12


def test_deepseek_v3_at_128gb_is_certified_without_a_backend() -> None:
    profile = load_profile(Path(__file__).resolve().parents[2] / "examples" / "deepseek-v3" / "profile.json.gz")
    budget = make_budget(profile.architecture, "128GB")
    plan = optimize(profile, budget, FormulationOptions(target=Target.LLAMACPP), SolveOptions())
    assert plan.solve.status.value == "optimal" and plan.solve.gap <= 1e-4
    assert "tied knapsack bound" in plan.solve.message and "not needed" in plan.solve.message
    kept = {len(lp.kept_experts) for lp in plan.layers}
    assert len(kept) == 1 and len({lp.top_k for lp in plan.layers}) == 1  # one count, one k
    assert plan.bytes.total <= budget.available + sum(budget.reserves.values())


def test_deepseek_v3_llamacpp_with_a_binding_speed_floor() -> None:
    """At 25 tokens/s the unconstrained tied plan (14.8 tokens/s on the example's device) is too slow: the search
    trades k and formats, and the Lagrangian bound leaves about 0.02% (the knapsack's integrality gap)."""
    profile = load_profile(Path(__file__).resolve().parents[2] / "examples" / "deepseek-v3" / "profile.json.gz")
    budget = make_budget(profile.architecture, "128GB")
    plan = optimize(profile, budget, FormulationOptions(target=Target.LLAMACPP, min_tokens_per_s=25.0),
                    SolveOptions(rel_gap=1e-3))
    assert plan.solve.status.value == "optimal" and plan.solve.gap <= 1e-3
    assert plan.predicted["decode_tokens_per_s"] >= 25.0
    assert len({lp.top_k for lp in plan.layers}) == 1 and plan.layers[0].top_k < 8
