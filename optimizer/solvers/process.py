"""Solvers in a child process, so that a time limit can be enforced on solvers that overrun it.

HiGHS and CP-SAT look at their clocks in most phases, but on large models some phases run for seconds
without looking: on the DeepSeek-V3 model HiGHS's presolve and root-node setup ran 4-6 s past a 15 s limit,
and CP-SAT's presolve 3-4 s past ``stop_search``. In this process they cannot be stopped. So, under a time
limit, a model with at least :data:`ISOLATE_SIZE` columns plus nonzeros (or any model, with
``SolverOptions.isolate=True``) is solved by ``python -m optimizer.solvers.worker DIR``
(:func:`solve_in_child`):

* the model, the warm start and the options go to ``DIR`` (``.npz`` and ``.json``);
* the worker runs the backend in its own process, told to stop a margin before the limit, writes every
  improving solution the backend reports (HiGHS's callback) to ``DIR/incumbent.npy`` and its result to
  ``DIR/result.npz`` and ``DIR/result.json`` (each written to a temporary name, then renamed);
* this process kills the worker at the limit if it is still running, then reads its result, else its last
  incumbent (status ``feasible``, no bound), else reports no solution.

:func:`run_process` (a command under a deadline: SIGINT a grace period before, kill at it) also runs CBC.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..errors import SolverError
from ..milp import MilpModel
from .base import SolverOptions, SolverResult, Termination

ISOLATE_SIZE = 100_000  # columns + nonzeros from which a time-limited solve runs in a child process


def isolated(model: MilpModel, options: SolverOptions) -> bool:
    """Whether this solve runs in a child process (see the module docstring)."""
    if options.time_limit is None or options.isolate is False:
        return False
    return bool(options.isolate) or model.num_vars + int(model.A.nnz) >= ISOLATE_SIZE


def run_process(args: list[str], log_path: str, deadline: float | None, grace: float,
                env: dict[str, str] | None = None) -> tuple[str, int]:
    """Run ``args`` with stdout and stderr to ``log_path``; past ``deadline - grace`` (a ``time.perf_counter()``
    instant) send SIGINT, at ``deadline`` kill. Returns (how it was stopped, "" if it ended by itself; exit code)."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            if deadline is None:
                return "", proc.wait()
            if grace > 0:
                try:
                    return "", proc.wait(timeout=max(deadline - grace - time.perf_counter(), 0.0))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGINT)
            try:
                stopped = "interrupted at the time limit" if grace > 0 else ""
                return stopped, proc.wait(timeout=max(deadline - time.perf_counter(), 0.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                return "killed at the time limit", proc.wait()
        finally:
            if proc.poll() is None:  # an exception (Ctrl-C) while waiting: never leave the process running
                proc.kill()
                proc.wait()


def solve_in_child(name: str, model: MilpModel, options: SolverOptions, warm_start: np.ndarray | None,
                   start: float) -> SolverResult:
    """Solve with backend ``name`` in a worker process that is killed ``options.time_limit`` seconds after
    ``start`` (a ``time.perf_counter()`` instant: when the backend was called)."""
    assert options.time_limit is not None
    deadline = start + float(options.time_limit)
    margin = min(1.0, 0.1 * float(options.time_limit))  # the worker's own stop comes this much earlier
    if time.perf_counter() >= deadline:
        return SolverResult(Termination.NO_SOLUTION, None, None, None, time.perf_counter() - start,
                            f"{name}: not run, the time limit was reached before it started")
    with tempfile.TemporaryDirectory(prefix=f"moecc-{name}-") as tmp:
        save_model(os.path.join(tmp, "model.npz"), model, warm_start)
        spec = {"backend": name, "rel_gap": options.rel_gap, "threads": options.threads, "seed": options.seed,
                "verbose": options.verbose, "stop_at": time.time() + (deadline - margin - time.perf_counter())}
        with open(os.path.join(tmp, "spec.json"), "w") as f:
            json.dump(spec, f)
        log_path = os.path.join(tmp, "worker.log")
        stopped, code = run_process([sys.executable, "-m", "optimizer.solvers.worker", tmp], log_path, deadline, 0.0,
                                    env=_worker_env())
        log = read_text(log_path)
        if options.verbose:
            print(log)
        seconds = time.perf_counter() - start
        result = _read_result(tmp, seconds)
        if result is not None:
            return result
        if not stopped:
            raise SolverError(f"{name}: the worker process exited with code {code} without a result: "
                              f"{log.strip().splitlines()[-1] if log.strip() else 'no output'}")
        return _incumbent_result(tmp, model, name, seconds)


def _worker_env() -> dict[str, str]:
    """This environment, with the directory holding the ``optimizer`` package first on the worker's path."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": root if not path else os.pathsep.join([root, path])}


def _incumbent_result(tmp: str, model: MilpModel, name: str, seconds: float) -> SolverResult:
    """After the kill: the last improving solution the worker wrote, if it is feasible."""
    path = os.path.join(tmp, "incumbent.npy")
    if os.path.exists(path):
        x = np.load(path)
        if x.shape == (model.num_vars,):
            x[model.integer] = np.round(x[model.integer]) + 0.0
            if feasible(model, x):
                return SolverResult(Termination.FEASIBLE, x, model.objective_value(x), None, seconds,
                                    f"{name}: killed at the time limit, best solution so far")
    return SolverResult(Termination.NO_SOLUTION, None, None, None, seconds,
                        f"{name}: killed at the time limit, no solution")


def feasible(model: MilpModel, x: np.ndarray, rel_tol: float = 1e-6) -> bool:
    """Whether ``x`` is integral where it must be and meets every row and bound, up to ``rel_tol`` of each
    row's magnitude (solvers report values rounded, or within their own tolerances)."""
    xi = x[model.integer]
    if np.abs(xi - np.round(xi)).max(initial=0.0) > rel_tol:
        return False
    if (x < model.col_lower - rel_tol).any() or (x > model.col_upper + rel_tol).any():
        return False
    ax = model.A @ x
    scale = rel_tol * (1.0 + abs(model.A) @ np.abs(x))
    return bool((ax >= model.row_lower - scale).all() and (ax <= model.row_upper + scale).all())


def save_model(path: str, model: MilpModel, warm_start: np.ndarray | None) -> None:
    A = model.A.tocsr()
    arrays = {"c": model.c, "offset": np.array(model.offset), "data": A.data, "indices": A.indices,
              "indptr": A.indptr, "shape": np.array(A.shape), "row_lower": model.row_lower,
              "row_upper": model.row_upper, "col_lower": model.col_lower, "col_upper": model.col_upper,
              "integer": model.integer}
    if warm_start is not None:
        arrays["warm_start"] = np.asarray(warm_start, dtype=float)
    np.savez(path, **arrays)


def load_model(path: str) -> tuple[MilpModel, np.ndarray | None]:
    with np.load(path) as z:
        A = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"].tolist()))
        model = MilpModel(c=z["c"], offset=float(z["offset"]), A=A, row_lower=z["row_lower"], row_upper=z["row_upper"],
                          col_lower=z["col_lower"], col_upper=z["col_upper"], integer=z["integer"])
        return model, (z["warm_start"] if "warm_start" in z.files else None)


def write_atomically(path: str, data: bytes) -> None:
    """Write ``data`` to a temporary name, then rename it to ``path``: a reader never sees half a file."""
    with open(f"{path}.part", "wb") as f:
        f.write(data)
    os.replace(f"{path}.part", path)


def npy_bytes(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(x, dtype=np.float64))
    return buf.getvalue()


def write_result(tmp: str, result: SolverResult) -> None:
    """The worker's side of :func:`_read_result` (the solution first, so that the JSON announces a whole result)."""
    if result.x is not None:
        write_atomically(os.path.join(tmp, "result.npy"), npy_bytes(result.x))
    meta = {"status": result.status.value, "objective": result.objective, "bound": result.bound,
            "seconds": result.seconds, "message": result.message}
    write_atomically(os.path.join(tmp, "result.json"), json.dumps(meta).encode())


def write_error(tmp: str, message: str) -> None:
    write_atomically(os.path.join(tmp, "result.json"), json.dumps({"error": message}).encode())


def _read_result(tmp: str, seconds: float) -> SolverResult | None:
    try:
        with open(os.path.join(tmp, "result.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if "error" in meta:
        raise SolverError(meta["error"])
    status = Termination(meta["status"])
    x = np.load(os.path.join(tmp, "result.npy")) if status.has_solution else None
    return SolverResult(status, x, meta["objective"], meta["bound"], seconds, meta["message"])


def read_text(path: str) -> str:
    """A solver's log or solution file, or "" if it was never written (a process killed early)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
