"""Does the joint plan beat the baselines on a real model? Solve, apply, reload, measure.

For every budget and solver: solve the profile into a plan, write the compressed checkpoint with
``runtime.apply.apply_plan`` (bytes written vs predicted), reload it with ``runtime.load`` and measure
test perplexity / bits per byte with ``runtime.evaluate``. One tidy row per (budget, solver).

Reproduce (numbers in the README and the issue notes):

    python -m experiments.plan_quality --model models/r1-deepseek-v3-tiny \
        --profile experiments/profiles/r1/english.json --budgets 3MB,4MB,6MB \
        --solvers highs,greedy,sequential,uniform --window 256 --max-tokens 16384 \
        --out experiments/results/plan_quality_r1.csv
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from experiments.entry import run_main
from experiments.results_io import write_rows
from optimizer.budget import make_budget
from optimizer.errors import MoeccError
from optimizer.formulation.instance import FormulationOptions
from optimizer.plan import save_plan
from optimizer.profile import load_profile
from optimizer.solve import SolveOptions, optimize


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--budgets", default="4MB")
    ap.add_argument("--solvers", default="highs,greedy,sequential,uniform")
    ap.add_argument("--formulation", default="predicted_loss")
    ap.add_argument("--method", default="rtn", help="quantizer used by the runtime (rtn or hqq)")
    ap.add_argument("--corpus", default="english")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from runtime.apply import apply_plan
    from runtime.evaluate import evaluate
    from runtime.load import load

    profile = load_profile(a.profile)
    ref = evaluate(a.model, corpus=a.corpus, max_tokens=a.max_tokens, window=a.window)
    rows = [{"budget": "original", "solver": "none", "status": "", "predicted_loss_increase": 0.0,
             "plan_bytes": None, "written_bytes": None, "perplexity": round(ref.perplexity, 4),
             "bits_per_byte": round(ref.bits_per_byte, 4), "kept_experts": None, "top_k": None}]
    print(rows[0], flush=True)
    for budget_text in a.budgets.split(","):
        budget = make_budget(profile.architecture, budget_text, context=0, overhead=0)
        for solver in a.solvers.split(","):
            t0 = time.perf_counter()
            try:
                plan = optimize(profile, budget, FormulationOptions(objective=a.formulation),
                                SolveOptions(solver=solver, reproducible=True))
            except MoeccError as exc:
                rows.append({"budget": budget_text, "solver": solver, "status": f"error: {exc}"[:100]})
                print(rows[-1], flush=True)
                continue
            solve_s = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                plan_path = Path(tmp) / "plan.json"
                save_plan(plan, plan_path)
                report = apply_plan(plan_path, a.model, Path(tmp) / "out", method=a.method)
                model = load(Path(tmp) / "out")
                res = evaluate(model, corpus=a.corpus, max_tokens=a.max_tokens,
                               window=a.window or ref.window)
            rows.append({
                "budget": budget_text, "solver": solver, "status": plan.solve.status.value,
                "predicted_loss_increase": round(plan.solve.objective, 6), "plan_bytes": plan.bytes.total,
                "written_bytes": report.weight_bytes, "perplexity": round(res.perplexity, 4),
                "bits_per_byte": round(res.bits_per_byte, 4),
                "kept_experts": sum(len(lp.kept_experts) for lp in plan.layers),
                "top_k": "/".join(str(lp.top_k) for lp in plan.layers), "solve_s": round(solve_s, 2),
            })
            print(rows[-1], flush=True)
    if a.out:
        write_rows(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
