"""CBC through PuLP (the CBC binary bundled with PuLP, or ``cbc`` on the PATH).

PuLP has no matrix interface, so the model is rebuilt as PuLP objects (one Python object per column and per
row, built from CSR slices) and written to an MPS file for the CBC executable; expect seconds, not
milliseconds, for models with 10^5 columns. PuLP does not report CBC's best bound: it is read from the
``Lower bound:`` line of CBC's log, which CBC prints whenever it stops short of a proven optimum.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time

import numpy as np

from ..errors import InputError, SolverError
from ..milp import MilpModel
from ..plan import SolveStatus
from .base import SolverBackend, SolverOptions, SolverResult

# PuLP's sol_status (pulp.constants.LpSolution*) -> SolveStatus.
_STATUS: dict[int, SolveStatus] = {
    1: SolveStatus.OPTIMAL,  # LpSolutionOptimal (also "optimal within gap tolerance")
    2: SolveStatus.FEASIBLE,  # LpSolutionIntegerFeasible: stopped on a limit holding a solution
    0: SolveStatus.NO_SOLUTION,  # LpSolutionNoSolutionFound: stopped on a limit before any solution
    -1: SolveStatus.INFEASIBLE,  # LpSolutionInfeasible
    -2: SolveStatus.ERROR,  # LpSolutionUnbounded: cannot happen for our bounded models
    -3: SolveStatus.ERROR,  # LpStatusUndefined
}
_BOUND_RE = re.compile(r"^Lower bound:\s*(\S+)", re.MULTILINE)
_LOG_DECIMALS = 1e-3  # CBC prints the bound with 3 decimals; widen by this so the parsed value stays a bound


def _cbc_path() -> str | None:
    """The CBC executable: PuLP's bundled binary if present and executable, else ``cbc`` on the PATH."""
    try:
        from pulp.apis.coin_api import pulp_cbc_path
    except ImportError:
        return None
    for path in (pulp_cbc_path, shutil.which("cbc")):
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


class CbcBackend(SolverBackend):
    name = "cbc"
    description = "COIN-OR CBC via PuLP (open source; slower to build models, bound parsed from CBC's log)"
    supports_continuous = True
    supports_warm_start = True

    @classmethod
    def available(cls) -> bool:
        return _cbc_path() is not None

    def solve(self, model: MilpModel, options: SolverOptions, warm_start: np.ndarray | None = None) -> SolverResult:
        """Minimise ``model`` with CBC; see :class:`SolverBackend`."""
        try:
            import pulp
        except ImportError as exc:
            raise SolverError("the 'cbc' backend needs PuLP: pip install pulp") from exc
        path = _cbc_path()
        if path is None:
            raise SolverError("the 'cbc' backend found no CBC executable (PuLP's bundled one or 'cbc' on PATH)")
        if warm_start is not None and np.shape(warm_start) != (model.num_vars,):
            raise InputError(f"warm_start: expected {model.num_vars} values, got shape {np.shape(warm_start)}")

        start = time.perf_counter()
        prob, cols = _build(pulp, model)
        if prob is None:  # an empty row that excludes 0
            return SolverResult(SolveStatus.INFEASIBLE, None, None, None, time.perf_counter() - start,
                                "CBC: not run, a row without coefficients excludes 0")
        if warm_start is not None:
            for var, value in zip(cols, np.asarray(warm_start, dtype=float).tolist()):
                var.setInitialValue(value, check=False)

        with tempfile.TemporaryDirectory(prefix="moecc-cbc-") as tmp:
            log_path = os.path.join(tmp, "cbc.log")
            seed = int(options.seed) % (2**31 - 2) + 1  # CBC treats seed 0 as "seed from the clock"
            threads = max(int(options.threads), 1)
            cmd = pulp.COIN_CMD(
                path=path, msg=False, logPath=log_path, gapRel=float(options.rel_gap),
                timeLimit=options.time_limit, warmStart=warm_start is not None,
                # 100+n threads: CBC's repeatable parallel mode; 1 thread: run serially (no "threads" option)
                threads=100 + threads if threads > 1 else None,
                options=[f"randomCbcSeed {seed}", f"randomSeed {seed}"],
            )
            cmd.tmpDir = tmp
            try:
                prob.solve(cmd)
            except pulp.PulpSolverError as exc:
                return SolverResult(SolveStatus.ERROR, None, None, None, time.perf_counter() - start, f"CBC: {exc}")
            log = _read(log_path)
        seconds = time.perf_counter() - start
        if options.verbose:
            print(log)

        status = _STATUS.get(int(prob.sol_status), SolveStatus.ERROR)
        message = f"CBC: {_result_line(log) or pulp.LpStatus.get(prob.status, 'unknown')}"
        if not status.has_plan:
            return SolverResult(status, None, None, None, seconds, message)
        x = np.array([np.nan if v.varValue is None else v.varValue for v in cols], dtype=float)
        x = _fill_unused(x, model)
        objective = model.objective_value(x)
        match = _BOUND_RE.search(log)
        if match:  # CBC's own bound, without the offset (PuLP's MPS carries no objective constant)
            bound: float | None = min(float(match.group(1)) + model.offset - _LOG_DECIMALS, objective)
        elif status == SolveStatus.OPTIMAL:
            bound = objective  # CBC proved optimality outright and printed no separate bound
        else:
            bound = None
        return SolverResult(status, x, objective, bound, seconds, message)


def _build(pulp, model: MilpModel):  # noqa: ANN001, ANN202
    """A PuLP problem equivalent to ``model`` without its offset, and its variables in column order."""
    prob = pulp.LpProblem("moecc", pulp.LpMinimize)
    lo = [None if not np.isfinite(v) else v for v in model.col_lower.tolist()]
    hi = [None if not np.isfinite(v) else v for v in model.col_upper.tolist()]
    cat = [pulp.LpInteger if i else pulp.LpContinuous for i in model.integer.tolist()]
    cols = [prob.add_variable(f"x{j}", lo[j], hi[j], cat[j]) for j in range(model.num_vars)]
    nz = np.flatnonzero(model.c)
    prob.setObjective(pulp.LpAffineExpression([(cols[j], v) for j, v in zip(nz.tolist(), model.c[nz].tolist())]))
    A = model.A.tocsr()
    indptr, indices, data = A.indptr, A.indices.tolist(), A.data.tolist()
    rlo, rhi = model.row_lower.tolist(), model.row_upper.tolist()
    for i in range(model.num_rows):
        s, e = int(indptr[i]), int(indptr[i + 1])
        lower, upper = rlo[i], rhi[i]
        if s == e:
            if lower > 0 or upper < 0:
                return None, cols
            continue
        terms = list(zip([cols[j] for j in indices[s:e]], data[s:e]))
        if lower == upper:
            sides = [(pulp.LpConstraintEQ, lower, "")]
        else:
            sides = [(pulp.LpConstraintGE, lower, "l"), (pulp.LpConstraintLE, upper, "u")]
        for sense, rhs, suffix in sides:
            if math.isfinite(rhs):
                expr = pulp.LpAffineExpression(terms)
                prob.addConstraint(pulp.LpConstraint(expr, sense, rhs=rhs), f"r{i}{suffix}")
    return prob, cols


def _fill_unused(x: np.ndarray, model: MilpModel) -> np.ndarray:
    """Round integer columns; give columns PuLP never wrote (in no row, zero cost) their value nearest 0."""
    free = np.isnan(x)
    x[free] = np.clip(0.0, model.col_lower[free], model.col_upper[free])
    x[free & model.integer] = np.ceil(x[free & model.integer])
    x[model.integer] = np.round(x[model.integer]) + 0.0  # + 0.0 turns -0.0 into 0.0
    return x


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _result_line(log: str) -> str:
    match = re.search(r"^Result - (.+)$", log, re.MULTILINE)
    return match.group(1).strip() if match else ""
