"""``python -m experiments run SWEEP ...`` runs a sweep; ``python -m experiments report DIR`` writes its report.

    python -m experiments list
    python -m experiments run r1 [--smoke] [--executor local|ray] [--address ADDR] [--workers N] [--resume]
                                 [--out DIR]
    python -m experiments report DIR [-o DIR/report.md]

SWEEP is a module name under ``experiments/sweeps/`` (``r1``, ``smoke``, ...) or a path to a Python file that
defines ``SWEEP``. Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import pkgutil
import sys
from pathlib import Path

from optimizer.errors import InputError

from . import sweeps
from .report import write_report
from .runner import EXECUTORS, RESULTS, progress_printer, run_sweep
from .sweep import Sweep


def load_sweep(name: str) -> Sweep:
    """The ``SWEEP`` of ``experiments/sweeps/NAME.py`` or of a Python file."""
    if name.endswith(".py"):
        path = Path(name)
        if not path.is_file():
            raise InputError(f"SWEEP: {name}: no such file")
        spec = importlib.util.spec_from_file_location(f"sweep_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        if name not in sweep_names():
            raise InputError(f"SWEEP: unknown sweep {name!r}; choose from {', '.join(sweep_names())} "
                             "or give a .py file")
        module = importlib.import_module(f"experiments.sweeps.{name}")
    sweep = getattr(module, "SWEEP", None)
    if not isinstance(sweep, Sweep):
        raise InputError(f"SWEEP: {name} defines no SWEEP = Sweep(...)")
    return sweep


def sweep_names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(sweeps.__path__) if not m.name.startswith("_"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the sweeps and their cell counts")
    r = sub.add_parser("run", help="run a sweep's cells (solve, compress, evaluate against the original)")
    r.add_argument("sweep")
    r.add_argument("--smoke", action="store_true", help="the sweep's quick subset")
    r.add_argument("--executor", choices=EXECUTORS, default="local")
    r.add_argument("--address", default=None, help="ray: cluster address (default: start a local Ray)")
    r.add_argument("--workers", type=int, default=None, help="parallel cells (default: CPUs)")
    r.add_argument("--resume", action="store_true", help="continue DIR: skip the cells it already holds")
    r.add_argument("--out", type=Path, default=None, help="results directory (default experiments/results/SWEEP)")
    r.add_argument("--no-report", action="store_true", help="do not write report.md at the end")
    rep = sub.add_parser("report", help="report.md with tables and plots from a results directory")
    rep.add_argument("dir", type=Path)
    rep.add_argument("-o", "--output", type=Path, default=None, help="default DIR/report.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "list":
        for name in sweep_names():
            s = load_sweep(name)
            print(f"{name:12s} {len(s.cells):4d} cells ({len(s.smoke)} smoke)  {s.description}")
        return 0
    if args.command == "report":
        print(f"wrote {write_report(args.dir, args.output)}")
        return 0
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers: must be >= 1, got {args.workers}")
    sweep = load_sweep(args.sweep)
    out = args.out or RESULTS / (sweep.name + ("-smoke" if args.smoke else ""))
    rows = run_sweep(sweep, out, args.smoke, args.executor, args.address, args.workers, args.resume,
                     on_row=progress_printer())
    failed = [r for r in rows if str(r.get("status", "")).startswith("error")]
    print(f"{len(rows)} rows in {out}/rows.csv" + (f"; {len(failed)} cells failed" if failed else ""))
    if not args.no_report:
        print(f"wrote {write_report(out)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
