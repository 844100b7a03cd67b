"""HiGHS through ``highspy`` (the default backend).

The model is passed in one call in row-wise CSR form (no per-variable Python loop), so models with hundreds of
thousands of columns load in milliseconds. Runs are repeatable for fixed options (seed and thread count).
HiGHS prints a copyright banner to fd 1 the first time a ``Highs`` object is built in a process; unless
``verbose``, that one banner is dropped so CLI output stays clean.

``time_limit`` covers the whole call: HiGHS gets what is left of it once the model is loaded. On large models
HiGHS runs seconds past it (presolve and root-node setup do not look at the clock), so those run in a child
process that is killed at the limit (:mod:`optimizer.solvers.process`), reporting each improving solution
through HiGHS's callback so that the best one so far survives the kill.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from ..errors import InputError, SolverError
from ..milp import MilpModel
from .base import SolverBackend, SolverOptions, SolverResult, Termination
from .process import isolated, solve_in_child

_STOPPED = "stopped"  # a limit was hit: FEASIBLE when HiGHS holds a primal solution, else NO_SOLUTION
_BOUNDED_INFEASIBLE = "unbounded_or_infeasible"  # INFEASIBLE when every column is bounded, else ERROR

# HighsModelStatus name -> Termination (or one of the two markers above); unlisted statuses are errors.
_STATUS: dict[str, Termination | str] = {
    "kOptimal": Termination.OPTIMAL,
    "kInfeasible": Termination.INFEASIBLE,
    "kUnboundedOrInfeasible": _BOUNDED_INFEASIBLE,
    "kTimeLimit": _STOPPED,
    "kIterationLimit": _STOPPED,
    "kSolutionLimit": _STOPPED,
    "kInterrupt": _STOPPED,
    "kHighsInterrupt": _STOPPED,
    "kObjectiveBound": _STOPPED,
    "kObjectiveTarget": _STOPPED,
    "kMemoryLimit": _STOPPED,
    "kModelEmpty": Termination.OPTIMAL,
}

_header_silenced = False
_scheduler_threads: int | None = None  # HiGHS keeps one thread pool per process, sized by the first run


def _new_highs(highspy, verbose: bool):  # noqa: ANN001, ANN202 - highspy is imported lazily
    """A ``Highs`` object; the one-per-process copyright banner HiGHS prints to fd 1 is dropped unless verbose."""
    global _header_silenced
    if verbose or _header_silenced:
        return highspy.Highs()
    _header_silenced = True
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        return highspy.Highs()
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class HighsBackend(SolverBackend):
    name = "highs"
    description = "HiGHS MIP solver via highspy (default; fast, deterministic, reports a proven bound)"
    supports_continuous = True
    supports_warm_start = True

    @classmethod
    def available(cls) -> bool:
        try:
            import highspy  # noqa: F401
        except ImportError:
            return False
        return True

    def solve(self, model: MilpModel, options: SolverOptions, warm_start: np.ndarray | None = None) -> SolverResult:
        """Minimise ``model`` with HiGHS; see :class:`SolverBackend`."""
        start = time.perf_counter()
        try:
            import highspy
        except ImportError as exc:
            raise SolverError("the 'highs' backend needs highspy: pip install highspy") from exc
        if warm_start is not None and np.shape(warm_start) != (model.num_vars,):
            raise InputError(f"warm_start: expected {model.num_vars} values, got shape {np.shape(warm_start)}")
        if isolated(model, options):
            return solve_in_child(self.name, model, options, warm_start, start)
        h = _new_highs(highspy, options.verbose)
        _set_options(h, options)
        A = model.A.tocsr()
        status = h.passModel(
            model.num_vars, model.num_rows, int(A.nnz), int(highspy.MatrixFormat.kRowwise),
            int(highspy.ObjSense.kMinimize), float(model.offset),
            _f64(model.c), _f64(model.col_lower), _f64(model.col_upper),
            _f64(model.row_lower), _f64(model.row_upper),
            A.indptr.astype(np.int32), A.indices.astype(np.int32), _f64(A.data),
            model.integer.astype(np.int32),  # HighsVarType: 0 continuous, 1 integer
        )
        if status == highspy.HighsStatus.kError:
            raise SolverError("HiGHS rejected the model (passModel returned kError); check bounds and coefficients")
        if warm_start is not None:
            sol = highspy.HighsSolution()
            sol.col_value = np.asarray(warm_start, dtype=np.float64).tolist()
            sol.value_valid = True
            h.setSolution(sol)
        if options.time_limit is not None:
            left = float(options.time_limit) - (time.perf_counter() - start)
            if left <= 0:
                return SolverResult(Termination.NO_SOLUTION, None, None, None, time.perf_counter() - start,
                                    "HiGHS: not run, the time limit was reached while loading the model")
            _set(h, "time_limit", left)
        if options.on_solution is not None:
            report = options.on_solution
            h.cbMipImprovingSolution.subscribe(lambda e: report(np.array(e.data_out.mip_solution, dtype=np.float64)))

        _size_thread_pool(highspy, max(int(options.threads), 1))
        run_status = h.run()
        model_status = h.getModelStatus()
        seconds = time.perf_counter() - start
        message = f"HiGHS: {h.modelStatusToString(model_status)}"
        if run_status == highspy.HighsStatus.kError and model_status == highspy.HighsModelStatus.kNotset:
            return SolverResult(Termination.ERROR, None, None, None, seconds, message)

        info = h.getInfo()
        has_x = info.primal_solution_status == int(highspy.SolutionStatus.kSolutionStatusFeasible) or (
            model_status == highspy.HighsModelStatus.kOptimal)
        status_ = _map_status(model_status.name, has_x, model)
        if not status_.has_solution:
            return SolverResult(status_, None, None, None, seconds, message)

        x = np.array(h.getSolution().col_value, dtype=np.float64)
        x[model.integer] = np.round(x[model.integer]) + 0.0  # + 0.0 turns -0.0 into 0.0
        objective = model.objective_value(x)
        bound: float | None
        if not model.integer.any():
            bound = objective if status_ == Termination.OPTIMAL else None  # an LP solved to optimality
        else:
            bound = float(info.mip_dual_bound)  # includes the offset, as the objective does
            bound = min(bound, objective) if np.isfinite(bound) else None
        return SolverResult(status_, x, objective, bound, seconds, message)


def _map_status(name: str, has_x: bool, model: MilpModel) -> Termination:
    mapped = _STATUS.get(name, Termination.ERROR)
    if mapped == _STOPPED:
        return Termination.FEASIBLE if has_x else Termination.NO_SOLUTION
    if mapped == _BOUNDED_INFEASIBLE:  # an all-bounded model cannot be unbounded
        bounded = bool(np.isfinite(model.col_lower).all() and np.isfinite(model.col_upper).all())
        return Termination.INFEASIBLE if bounded else Termination.ERROR
    return Termination(mapped)


def _size_thread_pool(highspy, threads: int) -> None:  # noqa: ANN001
    """HiGHS refuses to run with a ``threads`` option that differs from its existing pool; rebuild the pool."""
    global _scheduler_threads
    if _scheduler_threads != threads:  # also on the first solve, in case other code in this process ran HiGHS
        highspy.Highs.resetGlobalScheduler(True)
    _scheduler_threads = threads


def _set_options(h, options: SolverOptions) -> None:  # noqa: ANN001
    values: dict[str, object] = {
        "output_flag": bool(options.verbose),
        "mip_rel_gap": float(options.rel_gap),
        # HiGHS also stops at an absolute gap of 1e-6 by default; profile objectives are nats/token, often
        # ~1e-4 in all, so that stop declared R2's 4 MB plan optimal at a 2.3e-4 relative gap.
        "mip_abs_gap": 0.0,
        "random_seed": int(options.seed) % 2**31,
        "threads": max(int(options.threads), 1),
    }
    for key, value in values.items():
        _set(h, key, value)


def _set(h, key: str, value: object) -> None:  # noqa: ANN001
    if h.setOptionValue(key, value).name == "kError":
        raise SolverError(f"HiGHS refused option {key}={value!r}")


def _f64(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float64)
