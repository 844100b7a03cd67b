"""``python -m optimizer``: solve a profile into a plan, explain a plan, build the bundled example profile.

Exit codes: 0 = a proven optimum or an accepted feasible plan, 1 = solver failure (or no plan within the
time limit), 2 = bad input (one line on stderr naming the field, no traceback, no output file); an
infeasible budget also exits 2 and states the smallest achievable size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import InfeasibleError, InputError, SolverError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m optimizer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("solve", help="choose kept experts, per-layer top-k and per-block formats under a budget")
    s.add_argument("profile", help="profile.json (or .json.gz)")
    s.add_argument("-o", "--output", default="plan.json", help="where to write the plan (default plan.json)")
    s.add_argument("--budget", default="128GB", help="memory budget, e.g. 128GB or 120GiB (default 128GB)")
    s.add_argument("--context", type=int, default=8192, help="tokens of KV cache to reserve (default 8192)")
    s.add_argument("--overhead", default="2GiB", help="runtime overhead to reserve (default 2GiB)")
    s.add_argument("--target", choices=("hf", "llamacpp"), default="hf",
                   help="hf: per-expert formats and per-layer k; llamacpp: one format per (layer, projection), "
                        "one expert count, one k")
    s.add_argument("--formulation", default="importance", help="objective (see `python -m optimizer objectives`)")
    s.add_argument("--solver", default="highs", help="highs (default), cbc, cpsat, or a baseline: uniform, greedy, sequential")
    s.add_argument("--formats", default=None, help="comma-separated candidate formats (default: the profile's)")
    s.add_argument("--min-experts", type=float, default=0.0,
                   help="minimum kept experts per layer: a count, or a fraction (< 1) of the layer's experts")
    s.add_argument("--min-top-k", type=int, default=1, help="smallest top-k a layer may route to (default 1)")
    s.add_argument("--min-tokens-per-s", type=float, default=None, help="decode speed floor under the profiled bandwidth")
    s.add_argument("--expert-weight", type=float, default=None,
                   help="nats for dropping a layer's whole proxy mass (default: fitted to the profile's prune costs)")
    s.add_argument("--importance-alpha", type=float, default=0.5, help="a in I = a f + (1-a) s (default 0.5)")
    s.add_argument("--retain-ratio", type=float, default=0.75, help="sequential baseline: fraction of experts and k kept")
    s.add_argument("--time-limit", type=float, default=60.0, help="seconds (default 60)")
    s.add_argument("--gap", type=float, default=1e-4, help="relative optimality gap to prove (default 1e-4 = 0.01%%)")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-accelerate", action="store_true", help="skip the Lagrangian warm start and certificate")
    s.add_argument("--no-presolve", action="store_true", help="keep dominated formats in the model")
    s.add_argument("--reproducible", action="store_true", help="leave timings out of the plan (byte-identical reruns)")
    s.add_argument("--json", action="store_true", help="print a JSON summary instead of tables")

    e = sub.add_parser("explain", help="summarise a plan (bytes by kind, experts and k per layer, formats)")
    e.add_argument("plan")
    e.add_argument("--json", action="store_true")

    sub.add_parser("objectives", help="list the registered objectives")

    x = sub.add_parser("example", help="build the bundled DeepSeek-V3 profile (real routing statistics, prior sensitivities)")
    x.add_argument("-o", "--output", default="examples/deepseek-v3/profile.json.gz")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (InputError, InfeasibleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SolverError as exc:
        print(f"solver error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # output piped into `head`
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from . import report

    if args.command == "objectives":
        from .formulation.objectives import OBJECTIVES

        for name, (_, summary) in sorted(OBJECTIVES.items()):
            print(f"{name:16s} {summary}")
        return 0
    if args.command == "explain":
        from .plan import load_plan

        plan = load_plan(args.plan)
        print(json.dumps(report.plan_summary(plan), indent=1) if args.json else report.render_plan(plan))
        return 0
    if args.command == "example":
        from .examples.deepseek_v3 import build_deepseek_v3_profile
        from .profile import save_profile

        digest = save_profile(build_deepseek_v3_profile(), args.output)
        print(f"wrote {args.output} ({digest})")
        return 0
    return _solve(args)


def _solve(args: argparse.Namespace) -> int:
    from . import report
    from .baselines import BaselineOptions
    from .budget import make_budget
    from .formulation.instance import FormulationOptions
    from .formulation.objectives import ObjectiveOptions, get_objective
    from .plan import Target, save_plan
    from .profile import load_profile
    from .solve import SolveOptions, optimize, solver_names

    if args.solver not in solver_names():
        raise InputError(f"--solver: unknown {args.solver!r}; choose from {', '.join(solver_names())}")
    get_objective(args.formulation)
    for name in ("time_limit", "gap"):
        value = getattr(args, name)
        if not value > 0:
            raise InputError(f"--{name.replace('_', '-')}: must be positive, got {value}")
    if args.threads < 1:
        raise InputError(f"--threads: must be >= 1, got {args.threads}")
    if not 0 < args.retain_ratio <= 1:
        raise InputError(f"--retain-ratio: must lie in (0, 1], got {args.retain_ratio}")
    out = Path(args.output)
    if out.is_dir():
        raise InputError(f"-o: {out} is a directory")
    profile = load_profile(args.profile)
    budget = make_budget(profile.architecture, args.budget, args.context, args.overhead)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip()) if args.formats else None
    formulation = FormulationOptions(
        objective=args.formulation,
        objective_options=ObjectiveOptions(importance_alpha=args.importance_alpha, expert_weight=args.expert_weight),
        target=Target(args.target), formats=formats, min_experts=args.min_experts, min_top_k=args.min_top_k,
        min_tokens_per_s=args.min_tokens_per_s, presolve=not args.no_presolve,
    )
    options = SolveOptions(
        solver=args.solver, time_limit=args.time_limit, rel_gap=args.gap, threads=args.threads, seed=args.seed,
        accelerate=not args.no_accelerate, reproducible=args.reproducible,
        baseline=BaselineOptions(retain_ratio=args.retain_ratio, importance_alpha=args.importance_alpha),
    )
    plan = optimize(profile, budget, formulation, options)
    save_plan(plan, out)
    if args.json:
        print(json.dumps({**report.plan_summary(plan), "output": str(out)}, indent=1))
    else:
        print(report.render_plan(plan))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
