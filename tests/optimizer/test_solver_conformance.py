"""One conformance suite run against every registered solver: the MILP backends (a backend is skipped only if its
library is missing) and, at the end, the baselines behind the same interface.

Every MILP instance has integer coefficients so CP-SAT runs all of them; each optimum is derived by hand above it.
The baselines are heuristics (no bound), so they are held to what they declare: a feasible plan within the budget
under every constraint they honour, a status in the one :class:`Termination` enum, an :class:`InputError` naming
the flag for what they cannot follow, and the same plan on every run.
"""

from __future__ import annotations

import dataclasses
import functools
import subprocess
import sys
import time

import numpy as np
import pytest

from optimizer.baselines import BASELINE_CLASSES, Baseline, BaselineOptions
from optimizer.budget import Budget
from optimizer.errors import InfeasibleError, InputError, SolverError
from optimizer.formulation.constraints import build_milp
from optimizer.formulation.decisions import Decisions, check_decisions
from optimizer.formulation.decomposition import min_weight_bytes
from optimizer.formulation.instance import FormulationOptions, Instance, build_instance
from optimizer.llamacpp_mixes import mix_bytes
from optimizer.milp import MilpBuilder, MilpModel
from optimizer.plan import SolveStatus, Target, plan_to_json
from optimizer.profile import Profile
from optimizer.solve import SolveOptions, optimize, plan_status
from optimizer.solvers.base import CONSTRAINTS, Solver, SolverBackend, SolverOptions, SolverResult, Termination
from optimizer.solvers.registry import BACKENDS, SOLVERS, available_backends, get_backend, get_solver, solver_names
from optimizer.synthetic import synthetic_profile

INF = float("inf")
EXACT = SolverOptions(rel_gap=0.0)


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> SolverBackend:
    if not BACKENDS[request.param].available():
        pytest.skip(f"{request.param}: solver library not installed")
    return get_backend(request.param)


def check(model: MilpModel, res: SolverResult, status: Termination, objective: float | None = None) -> None:
    """The invariants every result must meet, plus the expected status and optimum."""
    assert isinstance(res.status, Termination)
    assert res.status == status, res.message
    assert res.seconds > 0
    if not status.has_solution:
        assert res.x is None and res.objective is None
        return
    assert res.x is not None and res.x.shape == (model.num_vars,)
    assert model.violation(res.x) <= 1e-6
    assert res.objective == pytest.approx(model.objective_value(res.x), abs=1e-6)
    if res.bound is not None:
        assert res.bound <= res.objective + 1e-6
    if objective is not None:
        assert res.objective == pytest.approx(objective, abs=1e-6)
    if status == Termination.OPTIMAL:
        assert res.bound is not None


# (a) 0/1 knapsack, capacity 10: weights (5, 4, 6, 3), values (10, 40, 30, 50); minimise -value.
# Pairs that fit: {0,1} 50, {0,3} 60, {1,2} 70, {1,3} 90, {2,3} 80; no triple fits (lightest 4+3+5=12 > 10).
# Optimum: items 1 and 3, value 90 -> objective -90.
def knapsack(offset: float = 0.0) -> MilpModel:
    b = MilpBuilder()
    x = b.add_vars("take", 4, cost=[-10, -40, -30, -50])
    b.add_rows("capacity", np.zeros(4, int), x, [5, 4, 6, 3], -INF, 10)
    b.offset = offset
    return b.build()


# (b) Multiple-choice knapsack: 3 blocks each store in exactly one of 3 formats, bytes <= 20.
#   block 0: bytes (8, 4, 2) cost (0, 1, 5);  block 1: (8, 4, 2) cost (0, 3, 9);  block 2: (16, 8, 4) cost (0, 2, 6)
# Block 2 at 16 leaves 4 bytes: blocks 0, 1 at 2+2, cost 14. At 4 (cost 6) blocks 0, 1 fit at 8+8: cost 6.
# At 8 (cost 2) 12 bytes remain: (4, 8) costs 1, (8, 4) 3, (4, 4) 4 -> total 3, the optimum, using all 20 bytes:
# formats (1, 0, 1), x = [0,1,0, 1,0,0, 0,1,0].
MCK_BYTES = np.array([[8, 4, 2], [8, 4, 2], [16, 8, 4]])
MCK_COST = np.array([[0, 1, 5], [0, 3, 9], [0, 2, 6]])
MCK_OPT = np.array([0, 1, 0, 1, 0, 0, 0, 1, 0], float)


def mck(budget: float = 20) -> MilpModel:
    b = MilpBuilder()
    x = b.add_vars("format", 9, cost=MCK_COST.ravel())
    b.add_rows("one_format", np.repeat(np.arange(3), 3), x, 1.0, 1, 1)
    b.add_rows("budget", np.zeros(9, int), x, MCK_BYTES.ravel(), -INF, budget)
    return b.build()


# (c) One layer of 4 experts: keep_e (memory cost 3, 1, 4, 2), one-hot top-k y_k for k = 1, 2, 3
# (quality cost 10, 4, 0), general integer n in [0, 4] with n = sum keep (equality) and n - sum k*y_k >= 0.
# Best per k keeps the k cheapest experts: k=1: 1+10 = 11; k=2: 1+2+4 = 7; k=3: 1+2+3+0 = 6 -> optimum 6,
# keep experts {0, 1, 3}, n = 3, y_3 = 1.
def topk_layer() -> MilpModel:
    b = MilpBuilder()
    keep = b.add_vars("keep", 4, cost=[3, 1, 4, 2])
    y = b.add_vars("top_k", 3, cost=[10, 4, 0])
    n = b.add_vars("num_kept", 1, lower=0, upper=4)
    b.add_rows("one_k", np.zeros(3, int), y, 1.0, 1, 1)
    b.add_rows("count", np.zeros(5, int), np.r_[keep, n], [1, 1, 1, 1, -1], 0, 0)
    b.add_rows("kept_ge_k", np.zeros(4, int), np.r_[n, y], [1, -1, -2, -3], 0, INF)
    return b.build()


def random_mck(blocks: int, seed: int, formats: int = 6) -> MilpModel:
    """A seeded multiple-choice knapsack shaped like the real problem: error falls as bits rise, bytes <= 4.3 bits."""
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 5, 6, 8])[:formats]
    size = rng.integers(50, 150, blocks)
    weight = rng.integers(100, 1000, blocks)
    cost = np.round(weight[:, None] * 1e4 * 2.0 ** -bits[None, :] * rng.uniform(0.8, 1.2, (blocks, formats)))
    b = MilpBuilder()
    x = b.add_vars("format", blocks * formats, cost=cost.ravel())
    b.add_rows("one_format", np.repeat(np.arange(blocks), formats), x, 1.0, 1, 1)
    b.add_rows("budget", np.zeros(x.size, int), x, (size[:, None] * bits[None, :]).ravel(), -INF, int(size.sum() * 4.3))
    return b.build()


def test_knapsack(backend: SolverBackend) -> None:
    model = knapsack()
    res = backend.solve(model, EXACT)
    check(model, res, Termination.OPTIMAL, -90)
    assert res.x.tolist() == [0, 1, 0, 1]


def test_multiple_choice_knapsack(backend: SolverBackend) -> None:
    model = mck()
    res = backend.solve(model, EXACT)
    check(model, res, Termination.OPTIMAL, 3)
    np.testing.assert_array_equal(res.x, MCK_OPT)
    assert res.bound == pytest.approx(3, abs=1e-2)


def test_equality_general_integer_and_row_lower_bound(backend: SolverBackend) -> None:
    model = topk_layer()
    res = backend.solve(model, EXACT)
    check(model, res, Termination.OPTIMAL, 6)
    np.testing.assert_array_equal(res.x, [1, 1, 0, 1, 0, 0, 1, 3])


# (d) The smallest bytes are 2 + 2 + 4 = 8 > 7: no format choice fits.
def test_infeasible(backend: SolverBackend) -> None:
    model = mck(budget=7)
    check(model, backend.solve(model, EXACT), Termination.INFEASIBLE)


# (e) The knapsack with offset 100: optimum -90 + 100 = 10, and the bound carries the offset too.
def test_objective_offset(backend: SolverBackend) -> None:
    model = knapsack(offset=100.0)
    res = backend.solve(model, EXACT)
    check(model, res, Termination.OPTIMAL, 10)
    assert res.bound == pytest.approx(10, abs=1e-2)


# (f) Warm starts from a poor feasible point (every block at its smallest format: 8 bytes, cost 20) and from the
# optimum itself leave the optimum of (b) unchanged.
@pytest.mark.parametrize("start", ["poor", "optimal"])
def test_warm_start_keeps_optimum(backend: SolverBackend, start: str) -> None:
    if not backend.supports_warm_start:
        pytest.skip(f"{backend.name} takes no warm start")
    model = mck()
    warm = np.array([0, 0, 1] * 3, float) if start == "poor" else MCK_OPT
    assert model.violation(warm) == 0
    res = backend.solve(model, EXACT, warm_start=warm)
    check(model, res, Termination.OPTIMAL, 3)


# (g) Same model, same options: the same x, bit for bit.
def test_deterministic(backend: SolverBackend) -> None:
    model = random_mck(60, seed=3)
    first, second = backend.solve(model, EXACT), backend.solve(model, EXACT)
    check(model, first, Termination.OPTIMAL)
    check(model, second, Termination.OPTIMAL)
    np.testing.assert_array_equal(first.x, second.x)


# (h) A 300-block x 6-format instance under a short time limit: some backends prove it, others stop (HiGHS
# typically needs ~1 s); either way the point is feasible and the bound honest. The limit covers the whole call
# (building the solver's model, starting CBC) on the wall clock, so it leaves room for a first solution.
def test_time_limit(backend: SolverBackend) -> None:
    model = random_mck(300, seed=0)
    res = backend.solve(model, SolverOptions(time_limit=1.0, rel_gap=0.0))
    assert res.status in (Termination.OPTIMAL, Termination.FEASIBLE), res.message
    check(model, res, res.status)
    if res.bound is not None:
        assert res.objective >= res.bound - 1e-9
    assert res.seconds < 10


# A pure LP (continuous x, y >= 0): min -x - y s.t. x + 2y <= 4, 3x + y <= 6. Both rows bind at
# x = 8/5, y = 6/5: objective -14/5, and an LP's bound is its objective.
def test_continuous_lp(backend: SolverBackend) -> None:
    b = MilpBuilder()
    v = b.add_vars("xy", 2, lower=0, upper=INF, integer=False, cost=[-1, -1])
    b.add_rows("rows", [0, 0, 1, 1], [v[0], v[1], v[0], v[1]], [1, 2, 3, 1], -INF, [4, 6])
    model = b.build()
    if not backend.supports_continuous:
        with pytest.raises(SolverError, match="integer"):
            backend.solve(model, EXACT)
        return
    res = backend.solve(model, EXACT)
    check(model, res, Termination.OPTIMAL, -2.8)
    np.testing.assert_allclose(res.x, [1.6, 1.2], atol=1e-6)
    assert res.bound == pytest.approx(-2.8, abs=1e-6)


# Switching the thread count between solves in one process (HiGHS keeps a process-wide thread pool).
def test_threads_option(backend: SolverBackend) -> None:
    model = mck()
    for threads in (2, 1):
        check(model, backend.solve(model, SolverOptions(rel_gap=0.0, threads=threads)), Termination.OPTIMAL, 3)


def test_warm_start_of_wrong_length_is_an_input_error(backend: SolverBackend) -> None:
    with pytest.raises(InputError, match="warm_start"):
        backend.solve(mck(), EXACT, warm_start=np.zeros(3))


def test_cpsat_rejects_fractional_coefficients() -> None:
    if not BACKENDS["cpsat"].available():
        pytest.skip("ortools not installed")
    b = MilpBuilder()
    x = b.add_vars("x", 2)
    b.add_rows("half", [0, 0], x, [0.5, 1.0], -INF, 1)
    with pytest.raises(SolverError, match="coefficients"):
        get_backend("cpsat").solve(b.build(), EXACT)


def test_unknown_backend_names_the_available_ones() -> None:
    with pytest.raises(SolverError) as err:
        get_backend("nope")
    for name in BACKENDS:
        assert name in str(err.value)


def test_registry() -> None:
    assert set(available_backends()) <= set(BACKENDS)
    assert available_backends()[0] == "highs" or "highs" not in available_backends()
    for name, cls in BACKENDS.items():
        assert cls.name == name and cls.description


def test_imports_are_lazy() -> None:
    code = ("import sys, optimizer.solvers.registry, optimizer.solvers.highs, optimizer.solvers.cbc, "
            "optimizer.solvers.cpsat; print(sorted(m for m in ('highspy', 'pulp', 'ortools') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------ the one registry
def test_one_registry_holds_backends_and_baselines() -> None:
    assert list(SOLVERS) == list(BACKENDS) + list(BASELINE_CLASSES)
    assert sorted(solver_names()) == sorted(SOLVERS)
    for name, cls in SOLVERS.items():
        assert issubclass(cls, Solver) and cls.name == name and cls.description
        assert cls.honours <= set(CONSTRAINTS)
        assert cls.proves_bound == issubclass(cls, SolverBackend)
    for name, cls in BASELINE_CLASSES.items():
        assert issubclass(cls, Baseline) and cls.available() and isinstance(get_solver(name), cls)
        assert not cls.supports_warm_start and not cls.presolve
        assert "min_tokens_per_s" not in cls.honours  # no baseline looks at bytes read per token
    for cls in BACKENDS.values():
        assert cls.honours == set(CONSTRAINTS)  # every constraint is a row of the model
    with pytest.raises(SolverError) as err:
        get_solver("nope")
    assert all(name in str(err.value) for name in SOLVERS)


# One termination enum for what a search reports; the plan's status is derived from it in one function.
@pytest.mark.parametrize("stop,objective,bound,expected", [
    (Termination.OPTIMAL, 1.0, 1.0 - 1e-5, SolveStatus.OPTIMAL),  # gap 1e-5 <= 1e-4
    (Termination.OPTIMAL, 1.0, 0.9, SolveStatus.FEASIBLE),  # the solver's "optimal" is not proven within the gap
    (Termination.OPTIMAL, 1.0, None, SolveStatus.FEASIBLE),  # no bound, nothing proven
    (Termination.FEASIBLE, 1.0, 1.0, SolveStatus.OPTIMAL),  # stopped at a limit, but another bound closed the gap
    (Termination.FEASIBLE, 1.0, None, SolveStatus.FEASIBLE),  # a heuristic's plan
    (Termination.INFEASIBLE, None, None, SolveStatus.INFEASIBLE),
    (Termination.NO_SOLUTION, None, None, SolveStatus.NO_SOLUTION),
    (Termination.ERROR, None, None, SolveStatus.ERROR),
])
def test_plan_status_is_derived_from_the_termination(stop: Termination, objective: float | None,
                                                      bound: float | None, expected: SolveStatus) -> None:
    status = plan_status(stop, objective, bound, rel_gap=1e-4)
    assert status is expected
    assert status.has_plan == stop.has_solution


# ------------------------------------------------------------------------------------------ baselines
# 8 layers (layer 0 dense; 4 routed experts, top-2, 1 shared), rows of 256 or 512: every candidate format (Q2_K ..
# BF16) stores every block, so llama.cpp's Q4_K_M mix is a plan of this profile. The budget is exactly that mix
# (every baseline fits it: uniform in Q4_K, the others by their rules); the ILP's smallest plan (k = 1, one
# expert per layer) fits no baseline.
SMALL = dict(num_layers=8, num_experts=4, top_k=2, hidden=256, expert_inter=256, dense_inter=512, vocab=512)
RESERVES = {"kv_cache": 2048, "overhead": 512}
HONOURED = {"min_experts": 3, "min_top_k": 2}  # an honoured constraint set to a binding-or-trivial value


@functools.lru_cache(maxsize=None)
def small_profile() -> Profile:
    return synthetic_profile(seed=4, **SMALL)


def mix_budget() -> Budget:
    return Budget(mix_bytes(small_profile().architecture, "Q4_K_M") + sum(RESERVES.values()), dict(RESERVES))


@pytest.fixture(params=sorted(BASELINE_CLASSES))
def baseline(request: pytest.FixtureRequest) -> Baseline:
    solver = get_solver(request.param)
    assert isinstance(solver, Baseline)
    return solver


def instance(budget: Budget, target: Target = Target.HF, **kw: object) -> Instance:
    return build_instance(small_profile(), budget, FormulationOptions(target=target, presolve=False, **kw))


def check_run(inst: Instance, run_status: Termination, d: Decisions | None, complete: bool) -> None:
    """A baseline's status is the one Termination enum and agrees with what it returned."""
    assert isinstance(run_status, Termination) and run_status != Termination.OPTIMAL  # a heuristic proves nothing
    assert (d is not None) == (run_status == Termination.FEASIBLE)
    assert run_status != Termination.NO_SOLUTION or not complete
    if d is not None:
        model, v = build_milp(inst)
        assert check_decisions(inst, model, v, d) == []
        assert d.weight_bytes(inst) <= inst.budget.available


@pytest.mark.parametrize("target", [Target.HF, Target.LLAMACPP])
def test_baseline_plan_is_feasible_within_the_budget(baseline: Baseline, target: Target) -> None:
    inst = instance(mix_budget(), target)
    run = baseline.run(inst)
    assert run.status == Termination.FEASIBLE and run.complete
    check_run(inst, run.status, run.decisions, run.complete)
    plan = optimize(small_profile(), mix_budget(), FormulationOptions(target=target),
                    SolveOptions(solver=baseline.name))
    assert plan.solve.solver == baseline.name and plan.solve.status is SolveStatus.FEASIBLE
    assert plan.solve.bound is None and plan.solve.gap is None  # proves_bound is False
    assert plan.bytes.total <= plan.bytes.available
    assert plan.solve.objective == pytest.approx(run.decisions.objective(inst), rel=1e-12)


def test_baseline_that_cannot_fit_reports_infeasible(baseline: Baseline) -> None:
    lo = min_weight_bytes(instance(Budget(10**15, {})))
    budget = Budget(lo + sum(RESERVES.values()), dict(RESERVES))  # the ILP's smallest plan, exactly
    run = baseline.run(instance(budget))
    assert run.status == Termination.INFEASIBLE and run.decisions is None
    check_run(instance(budget), run.status, run.decisions, run.complete)
    with pytest.raises(InfeasibleError, match=f"baseline {baseline.name} cannot fit the budget"):
        optimize(small_profile(), budget, FormulationOptions(), SolveOptions(solver=baseline.name))


def test_baseline_stopped_before_a_plan_reports_no_solution(baseline: Baseline) -> None:
    inst = instance(mix_budget())
    run = baseline.run(inst, deadline=time.perf_counter() - 1)
    check_run(inst, run.status, run.decisions, run.complete)
    if baseline.recipe:  # one plan, no search to stop
        assert run.status == Termination.FEASIBLE
    else:
        assert run.status == Termination.NO_SOLUTION


def test_baseline_is_deterministic(baseline: Baseline) -> None:
    inst = instance(mix_budget(), Target.HF)
    first, second = baseline.run(inst).decisions, baseline.run(inst).decisions
    assert first is not None and second is not None
    for field in dataclasses.fields(Decisions):
        np.testing.assert_array_equal(getattr(first, field.name), getattr(second, field.name))
    plans = [plan_to_json(optimize(small_profile(), mix_budget(), FormulationOptions(),
                                   SolveOptions(solver=baseline.name, reproducible=True))) for _ in range(2)]
    assert plans[0] == plans[1]


@pytest.mark.parametrize("constraint", CONSTRAINTS)
def test_baseline_honours_what_it_declares_and_refuses_the_rest(baseline: Baseline, constraint: str) -> None:
    if constraint in ("budget", "target"):  # set on every solve, checked above
        assert constraint in baseline.honours
        return
    value = HONOURED.get(constraint, 1.0)
    fo = FormulationOptions(**{constraint: value})
    if constraint not in baseline.honours:
        flag = "--" + constraint.replace("_", "-")
        with pytest.raises(InputError, match=f"--solver {baseline.name}: .*does not honour {flag}.*use highs"):
            optimize(small_profile(), mix_budget(), fo, SolveOptions(solver=baseline.name))
        return
    run = baseline.run(instance(mix_budget(), **{constraint: value}))
    check_run(instance(mix_budget(), **{constraint: value}), run.status, run.decisions, run.complete)
    assert run.status == Termination.FEASIBLE


# Options a baseline cannot follow are refused as InputError with the offending value named; greedy and
# sequential take every option they are given.
REFUSALS = {
    "uniform": (BaselineOptions(uniform_format="IQ1_S"), r"uniform format 'IQ1_S' is not among the candidate"),
    "llamacpp_mix": (BaselineOptions(mix="Q9_K_L"), r"unknown llama.cpp mix 'Q9_K_L'"),
}


def test_baseline_refusals_are_input_errors(baseline: Baseline) -> None:
    if baseline.name not in REFUSALS:
        pytest.skip(f"{baseline.name} refuses no option")
    options, match = REFUSALS[baseline.name]
    with pytest.raises(InputError, match=match):
        baseline.run(instance(mix_budget()), options)
    with pytest.raises(InputError, match=match):
        optimize(small_profile(), mix_budget(), FormulationOptions(),
                 SolveOptions(solver=baseline.name, baseline=options))


def test_baseline_follows_the_objective_as_declared(baseline: Baseline) -> None:
    """A recipe (``follows_objective`` False) gives the same plan whatever the objective; only its price changes."""
    if baseline.follows_objective:
        pytest.skip(f"{baseline.name} follows the objective")
    runs = [baseline.run(instance(mix_budget(), objective=o)).decisions for o in ("importance", "routing_mass")]
    assert runs[0] is not None and runs[1] is not None
    for field in dataclasses.fields(Decisions):
        np.testing.assert_array_equal(getattr(runs[0], field.name), getattr(runs[1], field.name))
