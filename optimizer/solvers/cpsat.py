"""CP-SAT (OR-Tools) for all-integer models.

CP-SAT works on integers only: every column must be integer with finite bounds and every row coefficient
an integer. Fractional row bounds are tightened exactly (``ceil`` of a lower, ``floor`` of an upper bound:
an integer row activity cannot lie strictly between). An objective with integer coefficients is passed as
integers and is exact; a fractional one is passed as CP-SAT's floating-point objective, which CP-SAT
scales to integers internally (``mip_wanted_precision``), so its bound is then exact only to that
precision. The objective reported here is always recomputed from ``x`` in the model's own units.

``time_limit`` covers the whole call: building the CP-SAT model in Python (seconds for 10^5 columns) looks at
the clock every few thousand columns and rows, the search gets what is left, and a timer calls
``stop_search`` at the limit. On large models CP-SAT's presolve still runs seconds past both, so those run in
a child process that is killed at the limit (:mod:`optimizer.solvers.process`).
"""

from __future__ import annotations

import threading
import time

import numpy as np

from ..errors import InputError, SolverError
from ..milp import MilpModel
from .base import SolverBackend, SolverOptions, SolverResult, Termination
from .process import isolated, solve_in_child

# CpSolverStatus name -> Termination. CP-SAT reports OPTIMAL also when it stops at relative_gap_limit.
_STATUS: dict[str, Termination] = {
    "OPTIMAL": Termination.OPTIMAL,
    "FEASIBLE": Termination.FEASIBLE,
    "INFEASIBLE": Termination.INFEASIBLE,
    "UNKNOWN": Termination.NO_SOLUTION,  # stopped on a limit before any solution
    "MODEL_INVALID": Termination.ERROR,
}
_LIMIT = 2**62  # CP-SAT values live in int64; keep well clear of overflow
_CHUNK = 4096  # columns or rows added between two looks at the clock
_LATE = "late"  # _add_rows: the deadline passed


def _integral(a: np.ndarray) -> np.ndarray:
    return np.abs(a - np.round(a)) <= 1e-9 * np.maximum(1.0, np.abs(a))


class CpSatBackend(SolverBackend):
    name = "cpsat"
    description = "OR-Tools CP-SAT (integer models only; strong with several workers)"
    supports_continuous = False
    supports_warm_start = True

    @classmethod
    def available(cls) -> bool:
        try:
            from ortools.sat.python import cp_model  # noqa: F401
        except ImportError:
            return False
        return True

    def solve(self, model: MilpModel, options: SolverOptions, warm_start: np.ndarray | None = None) -> SolverResult:
        """Minimise ``model`` with CP-SAT; see :class:`SolverBackend`."""
        start = time.perf_counter()
        try:
            from ortools.sat.python import cp_model
        except ImportError as exc:
            raise SolverError("the 'cpsat' backend needs OR-Tools: pip install ortools") from exc
        if warm_start is not None and np.shape(warm_start) != (model.num_vars,):
            raise InputError(f"warm_start: expected {model.num_vars} values, got shape {np.shape(warm_start)}")
        col_lo, col_hi = _check_integer_model(model)
        if isolated(model, options):
            return solve_in_child(self.name, model, options, warm_start, start)
        deadline = None if options.time_limit is None else start + float(options.time_limit)
        cp = cp_model.CpModel()
        xs = _new_vars(cp, col_lo, col_hi, deadline)
        why = _LATE if xs is None else _add_rows(cp_model, cp, xs, model, deadline)
        if why == _LATE or (not why and _late(deadline)):
            return SolverResult(Termination.NO_SOLUTION, None, None, None, time.perf_counter() - start,
                                "CP-SAT: not run, the time limit was reached while building the model")
        if why:
            return SolverResult(Termination.INFEASIBLE, None, None, None, time.perf_counter() - start,
                                f"CP-SAT: not run, {why}")
        nz = np.flatnonzero(model.c)
        costs = model.c[nz]
        if nz.size:
            weights = np.round(costs).astype(np.int64).tolist() if _integral(costs).all() else costs.tolist()
            cp.minimize(cp_model.LinearExpr.weighted_sum([xs[j] for j in nz.tolist()], weights))
        if warm_start is not None:
            for var, value in zip(xs, np.round(np.asarray(warm_start, dtype=float)).astype(np.int64).tolist()):
                cp.add_hint(var, value)

        solver = cp_model.CpSolver()
        params = solver.parameters
        params.num_workers = max(int(options.threads), 1)  # 1 worker: deterministic but weaker
        params.random_seed = int(options.seed) % 2**31
        params.relative_gap_limit = float(options.rel_gap)
        params.absolute_gap_limit = 0.0  # only the relative gap decides (objectives can be tiny; see highs.py)
        params.log_search_progress = bool(options.verbose)
        if deadline is not None:
            left = deadline - time.perf_counter()
            if left <= 0:
                return SolverResult(Termination.NO_SOLUTION, None, None, None, time.perf_counter() - start,
                                    "CP-SAT: not run, the time limit was reached while building the model")
            params.max_time_in_seconds = left
        code = _solve_until(solver, cp, deadline)
        seconds = time.perf_counter() - start
        name = solver.status_name(code)
        status = _STATUS.get(name, Termination.ERROR)
        message = f"CP-SAT: {name}"
        if name == "MODEL_INVALID":
            message += f" ({cp.validate()})"
        if not status.has_solution:
            return SolverResult(status, None, None, None, seconds, message)

        x = np.array(list(solver.response_proto.solution)[: model.num_vars], dtype=float)
        objective = model.objective_value(x)
        if nz.size:
            bound: float | None = min(float(solver.best_objective_bound) + model.offset, objective)
        else:
            bound = objective  # no objective: any feasible point is optimal
        return SolverResult(status, x, objective, bound, seconds, message)


def _late(deadline: float | None) -> bool:
    return deadline is not None and time.perf_counter() >= deadline


def _new_vars(cp, col_lo: list[int], col_hi: list[int], deadline: float | None) -> list | None:  # noqa: ANN001
    """One integer variable per column; ``None`` if ``deadline`` passes first."""
    xs: list = []
    for s in range(0, len(col_lo), _CHUNK):
        if _late(deadline):
            return None
        xs += [cp.new_int_var(lo, hi, "") for lo, hi in zip(col_lo[s:s + _CHUNK], col_hi[s:s + _CHUNK])]
    return xs


def _solve_until(solver, cp, deadline: float | None) -> int:  # noqa: ANN001
    """``solver.solve(cp)``, with a timer that calls ``stop_search`` at ``deadline`` as a backstop."""
    if deadline is None:
        return solver.solve(cp)
    timer = threading.Timer(max(deadline - time.perf_counter(), 0.0), solver.stop_search)
    timer.daemon = True
    timer.start()
    try:
        return solver.solve(cp)
    finally:
        timer.cancel()


def _check_integer_model(model: MilpModel) -> tuple[list[int], list[int]]:
    """Raise :class:`SolverError` unless CP-SAT can take ``model`` exactly; return integer column bounds."""
    if not model.integer.all():
        cont = np.flatnonzero(~model.integer)
        families = [name for name, cols in model.col_families.items() if np.isin(cols, cont).any()]
        raise SolverError(f"cpsat: CP-SAT needs every variable integer; {cont.size} continuous column(s)"
                          f" in famil{'y' if len(families) == 1 else 'ies'} {families}; use --solver highs or cbc")
    if not (np.isfinite(model.col_lower).all() and np.isfinite(model.col_upper).all()):
        raise SolverError("cpsat: CP-SAT needs finite bounds on every variable")
    data = model.A.data
    if not _integral(data).all():
        rows = np.repeat(np.arange(model.num_rows), np.diff(model.A.indptr))[~_integral(data)]
        families = [name for name, idx in model.row_families.items() if np.isin(idx, rows).any()]
        raise SolverError(f"cpsat: CP-SAT needs integer row coefficients; rows in {families} have fractional ones")
    lo = np.ceil(model.col_lower - 1e-9)
    hi = np.floor(model.col_upper + 1e-9)
    biggest = max(np.abs(lo).max(initial=0), np.abs(hi).max(initial=0), np.abs(data).max(initial=0))
    if biggest >= _LIMIT:
        raise SolverError(f"cpsat: a bound or coefficient ({biggest:.3g}) is too large for CP-SAT's int64 arithmetic")
    return lo.astype(np.int64).tolist(), hi.astype(np.int64).tolist()


def _add_rows(cp_model, cp, xs: list, model: MilpModel, deadline: float | None = None) -> str:  # noqa: ANN001
    """Add every row to ``cp``; return why the model is trivially infeasible, or "" when it is not (``_LATE``
    when ``deadline`` passes first)."""
    A = model.A.tocsr()
    indptr, indices = A.indptr, A.indices.tolist()
    data = np.round(A.data).astype(np.int64).tolist()
    lo = np.where(np.isfinite(model.row_lower), np.ceil(model.row_lower - 1e-9), -np.inf)
    hi = np.where(np.isfinite(model.row_upper), np.floor(model.row_upper + 1e-9), np.inf)
    if (np.abs(lo[np.isfinite(lo)]) >= _LIMIT).any() or (np.abs(hi[np.isfinite(hi)]) >= _LIMIT).any():
        raise SolverError("cpsat: a row bound is too large for CP-SAT's int64 arithmetic")
    for i in range(model.num_rows):
        if i % _CHUNK == 0 and _late(deadline):
            return _LATE
        s, e = int(indptr[i]), int(indptr[i + 1])
        lower = int(lo[i]) if np.isfinite(lo[i]) else cp_model.INT_MIN
        upper = int(hi[i]) if np.isfinite(hi[i]) else cp_model.INT_MAX
        if lower > upper:
            return f"row {i} admits no integer activity in [{model.row_lower[i]}, {model.row_upper[i]}]"
        if s == e:
            if lower > 0 or upper < 0:
                return f"row {i} has no coefficients and its bounds exclude 0"
            continue
        if lower == cp_model.INT_MIN and upper == cp_model.INT_MAX:
            continue
        expr = cp_model.LinearExpr.weighted_sum([xs[j] for j in indices[s:e]], data[s:e])
        cp.add_linear_constraint(expr, lower, upper)
    return ""
