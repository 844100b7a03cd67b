"""``--time-limit`` is honoured by every backend and path of ``optimize``: past the limit each step stops and
the best plan found so far comes back with status ``feasible`` and a message saying the limit was reached, or,
with no plan yet, SolverError "no plan within the time limit" (CLI exit 1).

The default suite tests the mechanism without timing asserts: deadlines that have already passed, and a fake
clock that advances one second per reading, so that a heuristic stops after a known number of steps. The
wall-clock checks at DeepSeek-V3 scale are ``@pytest.mark.slow``.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from optimizer import baselines
from optimizer.budget import Budget, format_bytes
from optimizer.errors import InfeasibleError, SolverError
from optimizer.formulation import tied
from optimizer.formulation.constraints import build_milp
from optimizer.formulation.decisions import check_decisions
from optimizer.formulation.decomposition import lagrangian, min_weight_bytes
from optimizer.formulation.instance import FormulationOptions, build_instance
from optimizer.milp import MilpBuilder, MilpModel
from optimizer.plan import SolveStatus, Target
from optimizer.solve import SolveOptions, optimize
from optimizer.solvers import cbc
from optimizer.solvers.base import SolverBackend, SolverOptions, Termination
from optimizer.solvers.process import (
    _incumbent_result,
    isolated,
    npy_bytes,
    run_process,
)
from optimizer.solvers.registry import BACKENDS, get_backend
from optimizer.synthetic import synthetic_profile

INF = float("inf")
ARCH = dict(num_layers=3, num_experts=8, top_k=4, hidden=256, expert_inter=64, dense_inter=256, vocab=256)
GROUPED = dict(ARCH, groups=2, topk_groups=1)
RESERVES = {"kv_cache": 2048, "overhead": 512}
PASSED = 1e-9  # a time limit that has passed before any work is done


class FakeClock:
    """``time.perf_counter`` stand-in that advances one second per reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest) -> SolverBackend:
    if not BACKENDS[request.param].available():
        pytest.skip(f"{request.param}: solver library not installed")
    return get_backend(request.param)


def budget_between(profile, fo: FormulationOptions, frac: float) -> Budget:
    """A budget ``frac`` of the way from the smallest plan to every block in its largest format."""
    inst = build_instance(profile, Budget(10**15, {}), dataclasses.replace(fo, presolve=False))
    q = np.flatnonzero(inst.block_quantizable)
    largest = int(np.maximum.reduceat(inst.pair_bytes, inst.pair_ptr[q]).sum() + inst.router_bytes.sum()
                  + inst.fixed_bytes)
    lo = min_weight_bytes(inst)
    return Budget(int(lo + frac * (largest - lo)) + sum(RESERVES.values()), dict(RESERVES))


def random_mck(blocks: int, seed: int = 0) -> MilpModel:
    """A multiple-choice knapsack like the real problem (integer data, so every backend takes it)."""
    rng = np.random.default_rng(seed)
    bits = np.array([2, 3, 4, 5, 6, 8])
    size = rng.integers(50, 150, blocks)
    cost = np.round(rng.integers(100, 1000, blocks)[:, None] * 1e4 * 2.0 ** -bits[None, :])
    b = MilpBuilder()
    x = b.add_vars("format", blocks * 6, cost=cost.ravel())
    b.add_rows("one_format", np.repeat(np.arange(blocks), 6), x, 1.0, 1, 1)
    b.add_rows("budget", np.zeros(x.size, int), x, (size[:, None] * bits[None, :]).ravel(), -INF, int(size.sum() * 4.3))
    return b.build()


# ------------------------------------------------------------------------------------------ backends
# The limit covers the whole call, model loading included: a limit that has passed stops each backend before
# its search (CBC used to be handed "-sec 1e-09" and solve the model anyway).
def test_backend_stops_when_the_limit_has_passed(backend: SolverBackend) -> None:
    model = random_mck(200)
    res = backend.solve(model, SolverOptions(time_limit=PASSED, rel_gap=0.0),
                        warm_start=np.tile([0, 0, 1, 0, 0, 0], 200))
    assert res.status == Termination.NO_SOLUTION and res.x is None, res.message
    assert "not run" in res.message and "time limit" in res.message


def test_cbc_process_gets_sigint_then_is_killed_at_the_deadline(tmp_path: Path) -> None:
    """CBC's root LP ignores its own -sec: the process is interrupted before the deadline and killed at it."""
    log = str(tmp_path / "log")
    stopped, code = run_process(["sleep", "60"], log, time.perf_counter() + 0.2, grace=0.1)
    assert (stopped, code) == ("interrupted at the time limit", -signal.SIGINT)
    # a process that ignores SIGINT (inherited across exec, so from its first instruction) is killed
    deaf = ["sh", "-c", "trap '' INT; echo ready; exec sleep 60"]
    stopped, code = run_process(deaf, log, time.perf_counter() + 1.0, grace=0.5)
    assert (stopped, code) == ("killed at the time limit", -signal.SIGKILL)
    assert Path(log).read_text() == "ready\n"


# HiGHS and CP-SAT overrun their own limits on large models (presolve, root setup): under a time limit those
# run in a worker process that is killed at the limit. The worker's answer is the in-process answer.
@pytest.mark.parametrize("name", ["highs", "cpsat"])
def test_isolated_solve_matches_the_in_process_one(name: str) -> None:
    if not BACKENDS[name].available():
        pytest.skip(f"{name} not installed")
    model = random_mck(40, seed=1)
    here = get_backend(name).solve(model, SolverOptions(rel_gap=0.0))
    there = get_backend(name).solve(model, SolverOptions(time_limit=60, rel_gap=0.0, isolate=True),
                                    warm_start=np.tile([1.0, 0, 0, 0, 0, 0], 40))
    assert here.status == there.status == Termination.OPTIMAL, there.message
    assert there.objective == pytest.approx(here.objective) and model.violation(there.x) == 0
    assert there.bound == pytest.approx(here.bound, rel=1e-6)
    assert not isolated(model, SolverOptions(time_limit=60)) and not isolated(random_mck(20_000), SolverOptions())
    assert isolated(random_mck(20_000), SolverOptions(time_limit=60))  # 120k columns + 240k nonzeros


def test_a_killed_worker_leaves_its_last_feasible_incumbent(tmp_path: Path) -> None:
    model = random_mck(3)
    assert _incumbent_result(str(tmp_path), model, "highs", 1.0).status == Termination.NO_SOLUTION  # none written
    good = np.tile([0, 0, 1, 0, 0, 0], 3).astype(float)
    (tmp_path / "incumbent.npy").write_bytes(npy_bytes(good + 1e-9))
    res = _incumbent_result(str(tmp_path), model, "highs", 1.0)
    assert res.status == Termination.FEASIBLE and res.bound is None and "killed at the time limit" in res.message
    np.testing.assert_array_equal(res.x, good)
    (tmp_path / "incumbent.npy").write_bytes(npy_bytes(np.zeros(18)))  # no format chosen: violates one_format
    assert _incumbent_result(str(tmp_path), model, "highs", 1.0).status == Termination.NO_SOLUTION


def test_highs_reports_each_improving_solution() -> None:
    if not BACKENDS["highs"].available():
        pytest.skip("highspy not installed")
    model = random_mck(300)
    seen: list[np.ndarray] = []
    res = get_backend("highs").solve(model, SolverOptions(time_limit=60, rel_gap=0.0, on_solution=seen.append))
    assert res.status == Termination.OPTIMAL and seen
    values = [model.objective_value(np.round(x)) for x in seen]
    assert all(x.shape == (model.num_vars,) and model.violation(np.round(x)) <= 1e-6 for x in seen)
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(res.objective)


def _pulp_mps(model: MilpModel, path: Path) -> None:
    """The MPS file PuLP writes for ``model`` (the objects the backend used to build through PuLP)."""
    pulp = pytest.importorskip("pulp")
    prob = pulp.LpProblem("moecc", pulp.LpMinimize)
    lo = [None if not np.isfinite(v) else v for v in model.col_lower.tolist()]
    hi = [None if not np.isfinite(v) else v for v in model.col_upper.tolist()]
    cols = [prob.add_variable(f"x{j}", lo[j], hi[j], pulp.LpInteger if i else pulp.LpContinuous)
            for j, i in enumerate(model.integer.tolist())]
    nz = np.flatnonzero(model.c)
    prob.setObjective(pulp.LpAffineExpression([(cols[j], v) for j, v in zip(nz.tolist(), model.c[nz].tolist())]))
    A = model.A.tocsr()
    for i in range(model.num_rows):
        terms = list(zip([cols[j] for j in A.indices[A.indptr[i]:A.indptr[i + 1]]],
                         A.data[A.indptr[i]:A.indptr[i + 1]].tolist()))
        lower, upper = float(model.row_lower[i]), float(model.row_upper[i])
        if not terms:
            continue
        sides = [(pulp.LpConstraintEQ, lower, "")] if lower == upper else [
            (pulp.LpConstraintGE, lower, "l"), (pulp.LpConstraintLE, upper, "u")]
        for sense, rhs, suffix in sides:
            if math.isfinite(rhs):
                prob.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(terms), sense, rhs=rhs), f"r{i}{suffix}")
    prob.writeMPS(str(path), rename=1)


def mixed_model() -> MilpModel:
    b = MilpBuilder()
    b.add_vars("x", 12, lower=np.arange(12) % 3 - 1, upper=[INF, 1, 2] * 4, cost=np.arange(12) - 4.5)
    b.add_vars("y", 3, integer=False, lower=[-INF, 0, 2], upper=[INF, 7, 2], cost=[0, 1.25, 0])
    b.add_rows("r", np.arange(15) % 5, np.arange(15), np.linspace(-3, 3, 15), [-INF, 1, 0, -2, 0.5],
               [3, 1, INF, 4, 0.5])
    b.add_rows("empty", [0], [0], 0.0, -1, 1)  # an explicit zero coefficient stays in the file
    return b.build()


def no_objective_model() -> MilpModel:
    b = MilpBuilder()
    b.add_vars("x", 3, lower=[-1, -INF, 0], upper=[INF, 5, 0])
    b.add_vars("y", 2, integer=False, lower=-INF, upper=INF)  # y[1] is in no row: not in the file
    b.add_rows("r", [0, 0, 1, 1, 2], [0, 1, 1, 2, 3], [1, 2, 0, 1, 1], [-INF, 1, 0], [3, 1, INF])
    return b.build()


# The CBC backend writes its MPS file itself (in chunks that look at the clock) instead of building PuLP objects;
# CBC must still see byte for byte the file PuLP wrote, so that its results do not change.
@pytest.mark.parametrize("make", [lambda: random_mck(40), mixed_model, no_objective_model])
def test_cbc_writes_the_mps_file_pulp_wrote(make, tmp_path: Path) -> None:
    model = make()
    _pulp_mps(model, tmp_path / "pulp.mps")
    mps = cbc._Mps.of(model)
    assert mps.write(str(tmp_path / "ours.mps"), None)
    assert (tmp_path / "ours.mps").read_bytes() == (tmp_path / "pulp.mps").read_bytes()
    assert not mps.write(str(tmp_path / "late.mps"), time.perf_counter() - 1)  # a passed deadline stops the writer


# ----------------------------------------------------------------------------------------- heuristics
def test_lagrangian_returns_its_best_plan_and_bound_at_the_deadline() -> None:
    p = synthetic_profile(seed=2, **ARCH)
    fo = FormulationOptions()
    inst = build_instance(p, budget_between(p, fo, 0.1), fo)
    model, v = build_milp(inst)
    full = lagrangian(inst)
    late = lagrangian(inst, deadline=time.perf_counter() - 1)
    assert full is not None and not full.stopped
    assert late is not None and late.stopped and late.evaluations < full.evaluations
    assert check_decisions(inst, model, v, late.decisions) == []  # the smallest plan, spare bytes spent
    assert late.bound <= full.bound + 1e-12 and late.bound <= late.objective
    assert late.objective >= full.bound - 1e-12


def test_tied_knapsack_stops_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    p = synthetic_profile(seed=4, **GROUPED)
    fo = FormulationOptions(target=Target.LLAMACPP)
    inst = build_instance(p, budget_between(p, fo, 0.2), fo)
    model, v = build_milp(inst)
    full = tied.tied_exact(inst)
    assert full is not None and not full.stopped
    assert tied.tied_exact(inst, deadline=time.perf_counter() - 1) is None  # no plan yet
    clock = FakeClock()
    monkeypatch.setattr(tied, "time", clock)
    again = tied.tied_exact(inst, deadline=1e9)
    assert again is not None and again.objective == full.objective and clock.now > 6  # more readings than below
    clock.now = 0.0
    partial = tied.tied_exact(inst, deadline=4.0)  # into the first expert count's bisection
    assert partial is not None and partial.stopped
    assert clock.now <= 6.0  # the reading that saw the deadline, then one for the result's seconds
    assert check_decisions(inst, model, v, partial.decisions) == []
    assert partial.bound <= full.bound + 1e-12 and partial.objective >= full.bound - 1e-12


@pytest.mark.parametrize("name", ["greedy", "sequential"])
@pytest.mark.parametrize("target", [Target.HF, Target.LLAMACPP])
def test_baselines_keep_their_plan_at_the_deadline(name: str, target: Target, monkeypatch: pytest.MonkeyPatch) -> None:
    p = synthetic_profile(seed=5, **GROUPED)
    fo = FormulationOptions(target=target)
    inst = build_instance(p, budget_between(p, fo, 0.3), dataclasses.replace(fo, presolve=False))
    model, v = build_milp(inst)
    full = baselines.run_baseline_until(name, inst)
    assert full.complete and full.decisions is not None
    none_yet = baselines.run_baseline_until(name, inst, deadline=time.perf_counter() - 1)
    assert none_yet.decisions is None and not none_yet.complete
    clock = FakeClock()
    monkeypatch.setattr(baselines, "time", clock)
    cut = baselines.run_baseline_until(name, inst, deadline=8.0)  # past setup (<= 5 readings), into the upgrades
    assert clock.now == 8.0
    assert not cut.complete and cut.decisions is not None
    assert check_decisions(inst, model, v, cut.decisions) == []
    assert cut.decisions.objective(inst) >= full.decisions.objective(inst) - 1e-12


# ------------------------------------------------------------------------------------------ optimize
def test_accelerated_solve_returns_the_lagrangian_plan_at_the_limit() -> None:
    p = synthetic_profile(seed=2, **ARCH)
    fo = FormulationOptions()
    budget = budget_between(p, fo, 0.1)
    plan = optimize(p, budget, fo, SolveOptions(time_limit=PASSED, rel_gap=1e-9))
    assert plan.solve.status == SolveStatus.FEASIBLE
    assert "time limit" in plan.solve.message and "Lagrangian" in plan.solve.message
    assert plan.solve.bound is not None and plan.solve.bound <= plan.solve.objective
    assert plan.bytes.total <= budget.available


@pytest.mark.parametrize("solver", ["highs", "cbc", "cpsat", "greedy", "sequential", "uniform"])
def test_no_plan_within_the_limit_is_a_solver_error(solver: str) -> None:
    if solver in BACKENDS and not BACKENDS[solver].available():
        pytest.skip(f"{solver} not installed")
    p = synthetic_profile(seed=2, **ARCH)
    fo = FormulationOptions()
    with pytest.raises(SolverError, match="no plan within the time limit"):
        optimize(p, budget_between(p, fo, 0.5), fo, SolveOptions(solver=solver, time_limit=PASSED, accelerate=False))


def test_llamacpp_solve_respects_the_limit() -> None:
    p = synthetic_profile(seed=4, **GROUPED)
    fo = FormulationOptions(target=Target.LLAMACPP)
    with pytest.raises(SolverError, match="no plan within the time limit"):
        optimize(p, budget_between(p, fo, 0.2), fo, SolveOptions(time_limit=PASSED))


def test_time_limit_counts_from_started() -> None:
    """A caller that spent the whole limit before optimize() (loading the profile) gets no search time."""
    p = synthetic_profile(seed=2, **ARCH)
    fo = FormulationOptions()
    budget = budget_between(p, fo, 0.5)
    assert optimize(p, budget, fo, SolveOptions(solver="greedy", time_limit=60)).solve.status == SolveStatus.FEASIBLE
    with pytest.raises(SolverError, match="no plan within the time limit of 60 s"):
        optimize(p, budget, fo, SolveOptions(solver="greedy", time_limit=60, started=time.perf_counter() - 61))


# -------------------------------------------------------------------------------- uniform's message
# The uniform baseline said it could not fit and quoted the joint solver's smallest plan (14.06 GB for
# DeepSeek-V3 at 128GB) instead of its own (134.19 GB). The message must state the size uniform needs, and
# that size must be exactly the smallest budget uniform fits in.
@pytest.mark.parametrize("target", [Target.HF, Target.LLAMACPP])
def test_uniform_states_its_own_smallest_size(target: Target) -> None:
    p = synthetic_profile(seed=6, **GROUPED)
    fo = FormulationOptions(target=target)
    joint = min_weight_bytes(build_instance(p, Budget(10**15, {}), fo)) + sum(RESERVES.values())
    with pytest.raises(InfeasibleError, match="baseline uniform cannot fit the budget") as err:
        optimize(p, Budget(joint, dict(RESERVES)), fo, SolveOptions(solver="uniform"))
    need = err.value.min_bytes
    assert need > joint
    message = str(err.value)
    assert f"needs {format_bytes(need)} ({need} bytes) including reserves" in message
    assert f"--budget {need} or more" in message
    plan = optimize(p, Budget(need, dict(RESERVES)), fo, SolveOptions(solver="uniform"))
    assert plan.bytes.total <= need - sum(RESERVES.values())
    with pytest.raises(InfeasibleError, match="baseline uniform"):
        optimize(p, Budget(need - 1, dict(RESERVES)), fo, SolveOptions(solver="uniform"))


# ------------------------------------------------------------------------------- DeepSeek-V3, wall clock
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deepseek-v3" / "profile.json.gz"
SLOW_CASES = [  # (solver, target, accelerate, limit): the two reported commands first
    ("cbc", "hf", False, 20), ("highs", "llamacpp", True, 30), ("cpsat", "hf", False, 20),
    ("highs", "hf", False, 20), ("highs", "hf", True, 20), ("cbc", "llamacpp", True, 20), ("greedy", "hf", True, 10),
    ("sequential", "hf", True, 10),
]


@pytest.mark.slow
@pytest.mark.parametrize("solver,target,accelerate,limit", SLOW_CASES)
def test_deepseek_v3_solves_stop_within_the_limit(solver: str, target: str, accelerate: bool, limit: float) -> None:
    """As ``python -m optimizer solve`` does once it passes ``started``: loading the profile counts too."""
    from optimizer.budget import make_budget
    from optimizer.profile import load_profile

    if not EXAMPLE.exists() or (solver in BACKENDS and not BACKENDS[solver].available()):
        pytest.skip("needs examples/deepseek-v3/profile.json.gz and the solver")
    start = time.perf_counter()
    profile = load_profile(EXAMPLE)
    budget = make_budget(profile.architecture, "128GB", 8192, "2GiB")
    options = SolveOptions(solver=solver, time_limit=limit, accelerate=accelerate, started=start)
    try:
        plan = optimize(profile, budget, FormulationOptions(target=Target(target)), options)
    except SolverError as exc:
        assert "no plan within the time limit" in str(exc)
        plan = None
    elapsed = time.perf_counter() - start
    assert elapsed <= max(1.1 * limit, limit + 2), f"{solver}/{target}: {elapsed:.1f} s for a {limit} s limit"
    if plan is not None:
        assert plan.bytes.total <= budget.available
        assert (plan.solve.status == SolveStatus.OPTIMAL or "time limit" in plan.solve.message
                or solver in ("greedy", "sequential"))
