"""The Lagrangian decomposition (optimizer/formulation/decomposition.py) on small synthetic instances.

L(lam) = min_x J(x) + lam (bytes(x) - cap) over the plans that satisfy every constraint but the byte row:
  * the value it returns is that expression at its own minimiser x(lam) (the identity);
  * no other structurally feasible plan (x(lam') for any lam') does better at lam (it is the minimum);
  * L(lam) <= the MILP optimum for every lam (weak duality), and the bisection's bound comes close to it.
"""
from __future__ import annotations

import numpy as np
import pytest

from optimizer.budget import Budget
from optimizer.formulation.decomposition import _Relaxation, lagrangian, min_weight_bytes
from optimizer.formulation.instance import FormulationOptions, build_instance
from optimizer.solve import SolveOptions, optimize
from optimizer.synthetic import synthetic_profile

SMALL = dict(num_layers=3, num_experts=8, top_k=2, hidden=256, expert_inter=256, dense_inter=256, vocab=256)
CASES = [(0, {}, 0.1), (1, {}, 0.4), (2, {"groups": 2, "topk_groups": 1, "top_k": 3}, 0.15)]


def _instance(seed: int, arch_kw: dict, frac: float):
    """A synthetic profile and its instance at ``frac`` of the way from the smallest to the largest plan."""
    p = synthetic_profile(seed=seed, **{**SMALL, **arch_kw})
    fo = FormulationOptions()
    loose = build_instance(p, Budget(10**15, {}), fo)
    q = np.flatnonzero(loose.block_quantizable)
    lo = min_weight_bytes(loose)
    hi = int(np.maximum.reduceat(loose.pair_bytes, loose.pair_ptr[q]).sum() + loose.router_bytes.sum()
             + loose.fixed_bytes)
    budget = Budget(int(lo + frac * (hi - lo)), {})
    return p, budget, fo, build_instance(p, budget, fo)


@pytest.fixture(scope="module", params=CASES, ids=["plain-tight", "plain-loose", "grouped"])
def case(request):
    p, budget, fo, inst = _instance(*request.param)
    lr = lagrangian(inst, rel_gap=1e-4)
    optimum = optimize(p, budget, fo, SolveOptions(time_limit=60, rel_gap=1e-9, accelerate=False)).solve.objective
    return inst, lr, optimum


def _lams(lr) -> list[float]:
    m = lr.multiplier
    assert m > 0  # the budget binds: bisection had to price bytes
    return [0.0, m / 16, m / 4, m / 2, 0.9 * m, m, 1.1 * m, 2 * m, 4 * m, 16 * m]


def test_lagrangian_identity_at_its_own_minimiser(case) -> None:
    inst, lr, _ = case
    relax = _Relaxation(inst)
    cap = inst.capacity
    for lam in _lams(lr):
        value, d, nbytes = relax.solve(lam)
        assert nbytes == d.weight_bytes(inst) - inst.fixed_bytes  # bytes(x) excludes the fixed tensors, as cap
        assert value == pytest.approx(d.objective(inst) + lam * (nbytes - cap), rel=1e-9, abs=1e-12)


def test_relaxation_is_the_minimum_over_its_own_candidates(case) -> None:
    """x(lam) is optimal for lam: any x(lam') (structurally feasible) gives J + lam (bytes - cap) >= L(lam)."""
    inst, lr, _ = case
    relax = _Relaxation(inst)
    cap = inst.capacity
    sols = [relax.solve(lam) for lam in _lams(lr)]
    plans = [(d, nb) for _, d, nb in sols] + [(lr.decisions, lr.decisions.weight_bytes(inst) - inst.fixed_bytes)]
    for lam, (value, _, _) in zip(_lams(lr), sols):
        for d, nb in plans:
            assert value <= d.objective(inst) + lam * (nb - cap) + 1e-12 * (1 + abs(value))


def test_bisection_bound_and_plan_against_the_milp_optimum(case) -> None:
    inst, lr, opt = case
    relax = _Relaxation(inst)
    tol = 1e-9 * abs(opt) + 1e-12
    assert lr.bound <= opt + tol  # weak duality
    assert all(relax.solve(lam)[0] <= opt + tol for lam in _lams(lr))
    # the plan fits and is (near) optimal; the bound is close: the certified gap of these instances is < 2%
    assert lr.decisions.weight_bytes(inst) <= inst.budget.available
    assert lr.objective == pytest.approx(lr.decisions.objective(inst), rel=1e-12)
    assert opt - tol <= lr.objective <= opt * 1.005
    assert (opt - lr.bound) / opt < 0.02 and lr.gap < 0.02
    # the bisection ends at the crossing: x(multiplier) fits, and just below it the plan no longer does
    assert relax.solve(lr.multiplier)[2] <= inst.capacity
    assert relax.solve(0.9 * lr.multiplier)[2] > inst.capacity
    # and its bound is the best L on a grid around it (L is concave, maximal at the crossing)
    grid = [relax.solve(lr.multiplier * f)[0] for f in np.geomspace(0.25, 4.0, 41)]
    assert max(grid) <= lr.bound * (1 + 1e-6) + 1e-12
