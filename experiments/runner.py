"""Running a sweep: executors, the result store, resume and progress.

    python -m experiments run SWEEP [--smoke] [--executor local|ray] [--address ADDR] [--workers N]
                                    [--resume] [--out DIR]

Results go to ``DIR`` (default ``experiments/results/<sweep>[-smoke]``): every finished cell is appended to
``cells.jsonl`` as soon as it ends (a killed run loses only the cells in flight), and ``rows.csv`` /
``rows.parquet`` are rewritten from it in the sweep's cell order at the end. ``--resume`` skips the cells
whose key is already in ``cells.jsonl``; without it an existing ``DIR`` with results is refused. A cell that
raises is recorded with ``status = "error: ..."`` and the sweep goes on.

Executors: ``local`` is a process pool of ``--workers`` processes (default: the machine's CPUs, at most the
number of cells), each with one torch thread; ``ray`` submits the same :func:`experiments.cell.run_cell` as
Ray tasks (one CPU each) to the cluster at ``--address`` (default: a local Ray started for the run).
"""
from __future__ import annotations

import json
import os
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from optimizer.errors import InputError

from .cell import run_cell
from .sweep import Cell, Sweep

CELLS_FILE = "cells.jsonl"
RESULTS = Path(__file__).resolve().parent / "results"  # default parent of a sweep's results directory
EXECUTORS = ("local", "ray")


def _safe_run(cell: Cell) -> dict[str, Any]:
    """:func:`run_cell`, with any error turned into a row (the sweep goes on)."""
    try:
        return run_cell(cell)
    except Exception as exc:  # noqa: BLE001 - a failed cell is a result, not the end of the sweep
        return {"key": cell.key(), **cell.to_json(), "status": f"error: {type(exc).__name__}: {exc}"[:300]}


def read_rows(out: Path) -> list[dict[str, Any]]:
    """Rows recorded in ``out/cells.jsonl`` (a torn last line from a killed run is ignored)."""
    path = Path(out) / CELLS_FILE
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _local(cells: Sequence[Cell], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1:
        for cell in cells:
            yield _safe_run(cell)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        pending = {pool.submit(_safe_run, c) for c in cells}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                yield fut.result()


def _ray(cells: Sequence[Cell], address: str | None, workers: int) -> Iterator[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise InputError("--executor ray: ray is not installed (pip install ray)") from None
    started = not ray.is_initialized()
    if started:
        kwargs = {"address": address} if address else {"num_cpus": workers, "include_dashboard": False}
        ray.init(ignore_reinit_error=True, log_to_driver=False, **kwargs)
    try:
        task = ray.remote(num_cpus=1)(_safe_run)
        pending = [task.remote(c) for c in cells]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                yield ray.get(ref)
    finally:
        if started:
            ray.shutdown()


def run_sweep(sweep: Sweep, out: str | Path, smoke: bool = False, executor: str = "local",
              address: str | None = None, workers: int | None = None, resume: bool = False,
              on_row: Callable[[dict[str, Any], int, int], None] | None = None) -> list[dict[str, Any]]:
    """Run the sweep's cells not yet in ``out`` (see the module docstring); returns every row, in cell order."""
    if executor not in EXECUTORS:
        raise InputError(f"--executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
    cells = sweep.selected(smoke)
    if not cells:
        raise InputError(f"sweep {sweep.name}: no {'smoke ' if smoke else ''}cells")
    out = Path(out)
    done = {r["key"]: r for r in read_rows(out)}
    if done and not resume:
        raise InputError(f"--out: {out} already holds {len(done)} results; pass --resume to continue it, "
                         "or choose a new directory")
    todo = [c for c in cells if c.key() not in done]
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo) or 1))
    out.mkdir(parents=True, exist_ok=True)
    stream = _ray(todo, address, workers) if executor == "ray" else _local(todo, workers)
    with open(out / CELLS_FILE, "a", encoding="utf-8") as fh:
        for i, row in enumerate(stream, 1):
            row = {"sweep": sweep.name, **row}
            fh.write(json.dumps(row, sort_keys=True) + "\n")
            fh.flush()
            done[row["key"]] = row
            if on_row:
                on_row(row, i, len(todo))
    rows = [done[c.key()] for c in cells if c.key() in done]
    write_tables(out, rows)
    return rows


def write_tables(out: Path, rows: list[dict[str, Any]]) -> None:
    """``rows.csv`` and ``rows.parquet`` (all keys as columns, first-seen order)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    frame.to_csv(out / "rows.csv", index=False)
    try:
        frame.to_parquet(out / "rows.parquet", index=False)
    except ImportError:  # pyarrow absent: the CSV is the record
        pass


def progress_printer() -> Callable[[dict[str, Any], int, int], None]:
    """A progress bar over the cells to run: cells done, the last cell's outcome, time left (tqdm's estimate)."""
    from tqdm.auto import tqdm

    state: dict[str, Any] = {}

    def show(row: dict[str, Any], done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"], state["t0"] = tqdm(total=total, unit="cell", desc="sweep"), time.perf_counter()
        bar = state["bar"]
        bar.update(1)
        kl = row.get("kl_mean")
        bar.set_postfix_str(f"{row.get('method')} @ {row.get('budget')}: "
                            + (f"KL {kl:.4g}" if isinstance(kl, float) else str(row.get("status"))[:40]))
        if done == total:
            bar.close()
            print(f"{total} cells in {time.perf_counter() - state['t0']:.0f} s")

    return show
