"""Benchmark every backend and baseline on the DeepSeek-V3-scale instance (58 MoE layers x 256 experts,
a format per (expert, projection) among 13 formats, per-layer k, group-limited routing).

Reproduce (numbers in the README):

    python benchmarks/bench_solvers.py --budget 128GB --time-limit 120 --out benchmarks/results/solvers.csv

For each method it reports build time, solve time, objective, proven bound, relative gap, and the gap of
the method's objective to the best proven bound (so the baselines' distance from the optimum is visible).
``highs-plain`` is HiGHS on the full MILP without the Lagrangian accelerator or the dominance presolve.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from experiments.results_io import write_rows
from optimizer.budget import make_budget
from optimizer.errors import MoeccError
from optimizer.examples.deepseek_v3 import build_deepseek_v3_profile
from optimizer.formulation.instance import FormulationOptions
from optimizer.solve import SolveOptions, optimize

METHODS = {
    # name: (solver, accelerate, presolve)
    "highs": ("highs", True, True),
    "highs-plain": ("highs", False, False),
    "cbc": ("cbc", True, True),
    "cbc-plain": ("cbc", False, False),
    "cpsat": ("cpsat", True, True),
    "cpsat-plain": ("cpsat", False, False),
    "uniform": ("uniform", False, False),
    "greedy": ("greedy", False, False),
    "sequential": ("sequential", False, False),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="128GB")
    ap.add_argument("--formulation", default="importance")
    ap.add_argument("--target", default="hf")
    ap.add_argument("--time-limit", type=float, default=120.0)
    ap.add_argument("--gap", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--out", default=None, help="CSV file for the result rows")
    args = ap.parse_args()

    t0 = time.perf_counter()
    profile = build_deepseek_v3_profile()
    print(f"profile built in {time.perf_counter() - t0:.2f} s: {len(profile.architecture.blocks)} blocks, "
          f"{len(profile.formats)} formats; python {platform.python_version()}, {os.cpu_count()} cpus", flush=True)
    budget = make_budget(profile.architecture, args.budget)
    rows = []
    for name in args.methods.split(","):
        solver, accelerate, presolve = METHODS[name]
        formulation = FormulationOptions(objective=args.formulation, target=args.target, presolve=presolve)
        options = SolveOptions(solver=solver, time_limit=args.time_limit, rel_gap=args.gap, threads=args.threads,
                               accelerate=accelerate)
        t = time.perf_counter()
        try:
            plan = optimize(profile, budget, formulation, options)
        except MoeccError as exc:
            rows.append({"method": name, "status": f"error: {exc}"[:120]})
            print(f"{name:12s} error: {exc}", flush=True)
            continue
        wall = time.perf_counter() - t
        s = plan.solve
        timing = s.options.get("timing", {})
        build = timing.get("build_seconds", float("nan"))
        rows.append({
            "method": name, "status": s.status.value, "objective": s.objective, "bound": s.bound, "gap": s.gap,
            "build_s": round(build, 3), "solve_s": round(wall - build, 3), "total_s": round(wall, 3),
            "variables": timing.get("variables"), "rows": timing.get("rows"), "bytes": plan.bytes.total,
            "message": s.message,
        })
        print(f"{name:12s} {s.status.value:9s} obj {s.objective:.6f} "
              f"bound {s.bound if s.bound is None else round(s.bound, 6)} "
              f"gap {s.gap if s.gap is None else f'{100 * s.gap:.4f}%'} "
              f"build {build:.2f}s solve {wall - build:.2f}s", flush=True)
    bounds = [r["bound"] for r in rows if r.get("bound") is not None]
    best_bound = max(bounds) if bounds else None
    for r in rows:
        if best_bound is not None and r.get("objective") is not None:
            r["gap_to_best_bound"] = (r["objective"] - best_bound) / abs(r["objective"])
    print("\nmethod        objective    gap to best proven bound")
    for r in rows:
        if "gap_to_best_bound" in r:
            print(f"{r['method']:12s} {r['objective']:.6f}   {100 * r['gap_to_best_bound']:.4f}%")
    if args.out:
        write_rows(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
