"""CBC (the binary bundled with PuLP, or ``cbc`` on the PATH), run as a subprocess under a wall-clock deadline.

The model is written straight from its CSR matrix as the very MPS file PuLP's ``writeMPS(rename=1)`` writes
for it (same rows, columns, names and number formatting; the tests compare the bytes), so CBC sees what it
saw through PuLP, without PuLP's one Python object per column and per row (15 s for the DeepSeek-V3 model
instead of ~3 s). The file is written in chunks that look at the clock; the line formats are PuLP's own
``%`` formats, kept as such.

CBC's own ``-sec`` limit is not looked at during its root LP, so ``time_limit`` is enforced on the process:
a grace period before the limit it gets SIGINT (CBC then stops and writes its best solution, if it has one),
and at the limit it is killed. ``time_limit`` covers the whole call, writing the model included. CBC's best
bound is read from the ``Lower bound:`` line of its log, which it prints whenever it stops short of a proven
optimum.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ..errors import InputError, SolverError
from ..milp import MilpModel
from .base import SolverBackend, SolverOptions, SolverResult, Termination
from .process import feasible, read_text, run_process

_BOUND_RE = re.compile(r"^Lower bound:\s*(\S+)", re.MULTILINE)
_LOG_DECIMALS = 1e-3  # CBC prints the bound with 3 decimals; widen by this so the parsed value stays a bound
_CHUNK = 20_000  # columns written between two looks at the clock
_DUMMY = -1  # PuLP's "__dummy" column, added when the objective has no term
_MARK_START = "    MARK      'MARKER'                 'INTORG'\n"
_MARK_END = "    MARK      'MARKER'                 'INTEND'\n"


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


def _grace(time_limit: float) -> float:
    """Seconds between SIGINT and the kill: CBC needs a moment to write the solution it holds."""
    return min(1.0, 0.1 * time_limit)


class CbcBackend(SolverBackend):
    name = "cbc"
    description = "COIN-OR CBC, PuLP's bundled binary, run as a subprocess (open source; bound parsed from CBC's log)"
    supports_continuous = True
    supports_warm_start = True

    @classmethod
    def available(cls) -> bool:
        return _cbc_path() is not None

    def solve(self, model: MilpModel, options: SolverOptions, warm_start: np.ndarray | None = None) -> SolverResult:
        """Minimise ``model`` with CBC; see :class:`SolverBackend`."""
        start = time.perf_counter()
        path = _cbc_path()
        if path is None:
            raise SolverError("the 'cbc' backend found no CBC executable (PuLP's bundled one or 'cbc' on PATH);"
                              " pip install pulp")
        if warm_start is not None and np.shape(warm_start) != (model.num_vars,):
            raise InputError(f"warm_start: expected {model.num_vars} values, got shape {np.shape(warm_start)}")
        deadline = None if options.time_limit is None else start + float(options.time_limit)
        with tempfile.TemporaryDirectory(prefix="moecc-cbc-") as tmp:
            files = {k: os.path.join(tmp, f"moecc.{k}") for k in ("mps", "mst", "sol", "log")}
            mps = _Mps.of(model)
            if mps is None:  # an empty row that excludes 0
                return SolverResult(Termination.INFEASIBLE, None, None, None, time.perf_counter() - start,
                                    "CBC: not run, a row without coefficients excludes 0")
            if not mps.write(files["mps"], deadline):
                return _stopped(start, "CBC: not run, the time limit was reached while writing the model")
            if warm_start is not None:
                mps.write_start(files["mst"], np.asarray(warm_start, dtype=float))
            remaining = None if deadline is None else deadline - time.perf_counter()
            if remaining is not None and remaining <= 0:
                return _stopped(start, "CBC: not run, the time limit was reached while writing the model")
            args = _arguments(path, files, options, remaining, warm_start is not None)
            stopped, code = run_process(args, files["log"], deadline, _grace(float(options.time_limit or 0.0)))
            log = read_text(files["log"])
            if options.verbose:
                print(log)
            sol = read_text(files["sol"])
        return _result(model, mps, sol, log, stopped, code, time.perf_counter() - start)


def _stopped(start: float, message: str) -> SolverResult:
    return SolverResult(Termination.NO_SOLUTION, None, None, None, time.perf_counter() - start, message)


def _arguments(path: str, files: dict[str, str], options: SolverOptions, remaining: float | None,
               warm: bool) -> list[str]:
    """CBC's command line, as PuLP's COIN_CMD builds it (plus the deadline-derived ``-sec``)."""
    seed = int(options.seed) % (2**31 - 2) + 1  # CBC treats seed 0 as "seed from the clock"
    threads = max(int(options.threads), 1)
    args = [path, files["mps"]]
    if warm:
        args += ["-mips", files["mst"]]
    if remaining is not None:
        grace = _grace(float(options.time_limit))
        args += ["-sec", f"{max(remaining - grace, 0.01):.3f}"]
    args += ["-randomCbcSeed", str(seed), "-randomSeed", str(seed), "-ratio", str(float(options.rel_gap))]
    if threads > 1:  # 100+n threads: CBC's repeatable parallel mode; 1 thread: run serially (no "threads" option)
        args += ["-threads", str(100 + threads)]
    return args + ["-timeMode", "elapsed", "-solve", "-printingOptions", "normal", "-solution", files["sol"]]


def _result(model: MilpModel, mps: _Mps, sol: str, log: str, stopped: str, code: int, seconds: float) -> SolverResult:
    """Map CBC's solution file and log onto a :class:`SolverResult`."""
    if not sol:
        if stopped:
            return SolverResult(Termination.NO_SOLUTION, None, None, None, seconds, f"CBC: {stopped}, no solution")
        return SolverResult(Termination.ERROR, None, None, None, seconds,
                            f"CBC: exited with code {code} and wrote no solution")
    status, x = mps.read_solution(sol)
    first_line = sol.partition("\n")[0].strip()
    message = f"CBC: {_result_line(log) or first_line}" + (f" ({stopped})" if stopped else "")
    if status == Termination.FEASIBLE and not feasible(model, x):  # stopped without an integer solution
        status = Termination.NO_SOLUTION
    if not status.has_solution:
        return SolverResult(status, None, None, None, seconds, message)
    objective = model.objective_value(x)
    match = _BOUND_RE.search(log)
    if match:  # CBC's own bound, without the offset (the MPS carries no objective constant)
        bound: float | None = min(float(match.group(1)) + model.offset - _LOG_DECIMALS, objective)
    elif status == Termination.OPTIMAL:
        bound = objective  # CBC proved optimality outright and printed no separate bound
    else:
        bound = None
    return SolverResult(status, x, objective, bound, seconds, message)


def _solution_status(first_line: str) -> Termination:
    """PuLP's reading of the first line of CBC's solution file (``COIN_CMD.get_status``)."""
    words = first_line.split()
    if not words:
        return Termination.ERROR
    if words[0] == "Stopped":  # "Stopped on time - objective value ...": stopped holding an integer solution
        return Termination.FEASIBLE if len(words) >= 5 and words[4] == "objective" else Termination.NO_SOLUTION
    return {"Optimal": Termination.OPTIMAL, "Infeasible": Termination.INFEASIBLE,
            "Integer": Termination.INFEASIBLE}.get(words[0], Termination.ERROR)


@dataclass(frozen=True, eq=False)
class _Mps:
    """The model as PuLP writes it: constraints (rows split into one side each) and the columns that appear."""

    model: MilpModel
    cons: sp.csc_matrix  # constraint x column coefficients, row indices sorted within each column
    sense: list[str]  # "E", "G" or "L" per constraint
    rhs: list[float]
    columns: np.ndarray  # model column of MPS column X%07d, in PuLP's order (names sorted as strings); -1 dummy

    @classmethod
    def of(cls, model: MilpModel) -> _Mps | None:
        """The constraints and columns; ``None`` when a row without coefficients excludes 0."""
        A = model.A.tocsr()
        if not A.has_canonical_format:
            A = A.copy()
            A.sum_duplicates()
        lo, hi = model.row_lower, model.row_upper
        empty = np.diff(A.indptr) == 0
        if (empty & ((lo > 0) | (hi < 0))).any():
            return None
        eq = ~empty & (lo == hi) & np.isfinite(lo)
        ge = ~empty & (lo != hi) & np.isfinite(lo)
        le = ~empty & (lo != hi) & np.isfinite(hi)
        row = np.concatenate([np.flatnonzero(eq), np.flatnonzero(ge), np.flatnonzero(le)])
        side = np.concatenate([np.zeros(int(eq.sum() + ge.sum()), int), np.ones(int(le.sum()), int)])
        order = np.lexsort((side, row))
        row, kinds = row[order], np.array(["E"] * int(eq.sum()) + ["G"] * int(ge.sum()) + ["L"] * int(le.sum()))[order]
        rhs = np.where(kinds == "L", hi[row], lo[row]) if row.size else np.zeros(0)
        cons = A[row].tocsc()
        cons.sort_indices()
        used = np.flatnonzero((model.c != 0) | (np.diff(cons.indptr) > 0))
        columns = np.array(sorted(used.tolist(), key=str), dtype=np.int64)
        if not (model.c != 0).any():  # PuLP adds "__dummy" (fixed at 0, cost 1); it sorts before "x..."
            columns = np.concatenate([[_DUMMY], columns])
        return cls(model, cons, kinds.tolist(), rhs.tolist(), columns)

    def write(self, path: str, deadline: float | None) -> bool:
        """Write the MPS file; ``False`` (file incomplete) when ``deadline`` passes first."""
        with open(path, "w") as f:
            f.write("*SENSE:Minimize\nNAME          MODEL\nROWS\n N  OBJ\n")
            f.write("".join([f" {s}  C{k:07d}\n" for k, s in enumerate(self.sense)]))
            f.write("COLUMNS\n")
            for s in range(0, len(self.columns), _CHUNK):
                if deadline is not None and time.perf_counter() >= deadline:
                    return False
                f.write("".join(self._column_lines(s, min(s + _CHUNK, len(self.columns)))))
            if deadline is not None and time.perf_counter() >= deadline:
                return False
            f.write("RHS\n")
            f.write("".join(["    RHS       C%07d  % .12e\n" % (k, r if r != 0 else 0)
                             for k, r in enumerate(self.rhs)]))
            f.write("BOUNDS\n")
            f.write("".join(self._bound_lines()))
            f.write("ENDATA\n")
        return True

    def _column_lines(self, first: int, last: int) -> list[str]:
        """COLUMNS lines of MPS columns [first, last): per column its INTORG marker if integer, one line per
        constraint (in constraint order), its objective line, its INTEND marker."""
        model = self.model
        names = np.arange(first, last)
        cols = self.columns[first:last]
        real = cols != _DUMMY
        names, cols = names[real], cols[real]
        sub = self.cons[:, cols]
        sub.sort_indices()
        count = np.diff(sub.indptr)
        integer = model.integer[cols]
        cost = model.c[cols]
        has_obj = cost != 0
        size = 2 * integer + count + has_obj
        begin = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
        out = np.empty(int(size.sum()), dtype=object)
        out[begin[integer]] = _MARK_START
        out[(begin + size - 1)[integer]] = _MARK_END
        entry_col = np.repeat(np.arange(len(cols)), count)
        entry_pos = begin[entry_col] + integer[entry_col] + (np.arange(sub.nnz) - sub.indptr[entry_col])
        out[entry_pos] = ["    X%07d  C%07d  % .12e\n" % t for t in
                          zip(names[entry_col].tolist(), sub.indices.tolist(), sub.data.tolist())]
        out[(begin + integer + count)[has_obj]] = ["    X%07d  OBJ       % .12e\n" % t for t in
                                                   zip(names[has_obj].tolist(), cost[has_obj].tolist())]
        lines = out.tolist()
        if first == 0 and self.columns[0] == _DUMMY:
            lines.insert(0, "    %-8s  %-8s  % .12e\n" % ("X0000000", "OBJ", 1))
        return lines

    def _bound_lines(self) -> list[str]:
        """PuLP's ``writeMPSBoundLines``, one string per column."""
        model = self.model
        real = self.columns != _DUMMY
        cols = np.maximum(self.columns, 0)
        lo, hi, integer = model.col_lower[cols], model.col_upper[cols], model.integer[cols]
        fixed = real & np.isfinite(lo) & (lo == hi)
        binary = real & ~fixed & (lo == 0) & (hi == 1) & integer
        out = np.full(len(cols), "", dtype=object)
        out[~real] = [" FX BND       %-8s  % .12e\n" % (f"X{n:07d}", 0) for n in np.flatnonzero(~real).tolist()]
        out[fixed] = [" FX BND       X%07d  % .12e\n" % t
                      for t in zip(np.flatnonzero(fixed).tolist(), lo[fixed].tolist())]
        out[binary] = [" BV BND       X%07d\n" % n for n in np.flatnonzero(binary).tolist()]
        rest = np.flatnonzero(real & ~fixed & ~binary)
        out[rest] = [_general_bounds(f"X{n:07d}", lo[n], hi[n], bool(integer[n])) for n in rest.tolist()]
        return out.tolist()

    def write_start(self, path: str, x: np.ndarray) -> None:
        """The warm start in CBC's solution format, as PuLP's ``COIN_CMD.writesol`` writes it."""
        lo, hi = self.model.col_lower, self.model.col_upper
        values = [0 if j == _DUMMY or not lo[j] <= v <= hi[j] else v  # PuLP drops values outside the bounds
                  for j, v in zip(self.columns.tolist(), x[np.maximum(self.columns, 0)].tolist())]
        with open(path, "w") as f:
            f.write("Stopped on time - objective value 0\n")
            f.write("".join(["%7s X%07d %15s %23s\n" % (n, n, v, 0) for n, v in enumerate(values)]))

    def read_solution(self, text: str) -> tuple[Termination, np.ndarray]:
        """Status and x from CBC's solution file (``printingOptions normal``: nonzero column values only)."""
        lines = text.splitlines()
        status = _solution_status(lines[0] if lines else "")
        x = np.full(self.model.num_vars, np.nan)
        x[self.columns[self.columns >= 0]] = 0.0  # columns CBC saw; the rest are set by _fill_unused
        for line in lines[1:]:
            words = line.split()
            if words and words[0] == "**":  # CBC marks infeasible values
                words = words[1:]
            if len(words) >= 3 and words[1].startswith("X"):
                j = int(self.columns[int(words[1][1:])])
                if j != _DUMMY:
                    x[j] = float(words[2])
        return status, _fill_unused(x, self.model)


def _general_bounds(name: str, lo: float, hi: float, integer: bool) -> str:
    """Bound lines of a column that is neither fixed nor binary (PuLP's ``writeMPSBoundLines``)."""
    lines = ""
    if not math.isfinite(lo):
        lines += (" MI BND       %-8s\n" if math.isfinite(hi) else " FR BND       %-8s\n") % name
    elif lo != 0 or (integer and not math.isfinite(hi)):
        lines += " LO BND       %-8s  % .12e\n" % (name, float(lo))
    if math.isfinite(hi):
        lines += " UP BND       %-8s  % .12e\n" % (name, float(hi))
    return lines


def _fill_unused(x: np.ndarray, model: MilpModel) -> np.ndarray:
    """Round integer columns; give columns CBC never saw (in no row, zero cost) their value nearest 0."""
    free = np.isnan(x)
    x[free] = np.clip(0.0, model.col_lower[free], model.col_upper[free])
    x[free & model.integer] = np.ceil(x[free & model.integer])
    x[model.integer] = np.round(x[model.integer]) + 0.0  # + 0.0 turns -0.0 into 0.0
    return x


def _result_line(log: str) -> str:
    match = re.search(r"^Result - (.+)$", log, re.MULTILINE)
    return match.group(1).strip() if match else ""
