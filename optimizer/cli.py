"""``python -m optimizer``: solve a profile into a plan, explain it, chart loss vs speed, build example profiles.

Exit codes: 0 = a proven optimum or an accepted feasible plan, 1 = solver failure (or no plan within the
time limit), 2 = bad input (one line on stderr naming the field, no traceback, no output file); an
infeasible budget also exits 2 and states the smallest achievable size.

Every flag is checked before the profile is read: numbers finite and within the ``MAX_*`` bounds below (and
those of :mod:`optimizer.budget`, :mod:`optimizer.model_spec`, :mod:`optimizer.profile`), listed in
``docs/optimizer.md`` ("Input limits"); files are read through the bounded reader of :mod:`optimizer.jsonio`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from .budget import MAX_CONTEXT, parse_bytes
from .errors import InfeasibleError, InputError, SolverError, error_line
from .formats import get_format
from .jsonio import check_output_path
from .model_spec import MAX_EXPERTS
from .profile import MAX_COST_NATS

#: Longest ``--time-limit``, in seconds (about 11.6 days).
MAX_TIME_LIMIT_S = 1e6
#: Largest ``--gap``: a relative gap above 1 proves nothing a feasible plan does not.
MAX_GAP = 1.0
#: Most ``--threads`` (also profiling's): HiGHS aborts the whole process when it cannot start the threads asked for.
MAX_THREADS = 256
#: Largest ``--seed`` (also profiling's): the solvers' and numpy's seed range.
MAX_SEED = 2**31 - 1
#: Largest ``--min-tokens-per-s``.
MAX_TOKENS_PER_S = 1e9


class OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``error: argument --context: invalid int value: 'x'``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {' '.join(message.split())}\n")


def check_range(value: float, flag: str, low: float, high: float, open_low: bool = False) -> None:
    """Refuse a value that is not finite or lies outside ``[low, high]`` (``(low, high]`` when ``open_low``)."""
    inside = math.isfinite(value) and (low < value if open_low else low <= value) and value <= high
    if not inside:
        raise InputError(f"{flag}: must lie in {'(' if open_low else '['}{_num(low)}, {_num(high)}], got {_num(value)}")


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _add_budget_arguments(p: argparse.ArgumentParser, output_help: str, output_default: str) -> None:
    """The profile, the output and the budget with its reserves: what ``solve`` and ``pareto`` both take."""
    p.add_argument("profile", help="profile.json (or .json.gz)")
    p.add_argument("-o", "--output", default=output_default, help=output_help)
    p.add_argument("--budget", default="128GB", help="memory budget, e.g. 128GB or 120GiB (default 128GB)")
    p.add_argument("--context", type=int, default=8192, help="tokens of KV cache to reserve (default 8192)")
    p.add_argument("--overhead", default="2GiB", help="runtime overhead to reserve (default 2GiB)")
    p.add_argument("--device", default=None,
                   help="who decodes: a preset (see `python -m optimizer devices`) or a device JSON (`python -m "
                        "profiling device -o FILE`); replaces the profile's bandwidth and format throughput")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m optimizer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("solve", help="choose kept experts, per-layer top-k and per-block formats under a budget")
    _add_budget_arguments(s, "where to write the plan (default plan.json)", "plan.json")
    s.add_argument("--target", choices=("hf", "llamacpp"), default="hf",
                   help="hf: per-expert formats and per-layer k; llamacpp: one format per (layer, projection), "
                        "one expert count, one k")
    s.add_argument("--formulation", default="importance", help="objective (see `python -m optimizer objectives`)")
    s.add_argument("--solver", default="highs",
                   help="highs (default), cbc, cpsat, or a baseline: uniform, greedy, sequential, llamacpp_mix")
    s.add_argument("--formats", default=None, help="comma-separated candidate formats (default: the profile's)")
    s.add_argument("--min-experts", type=float, default=0.0,
                   help="minimum kept experts per layer: a count, or a fraction (< 1) of the layer's experts")
    s.add_argument("--min-top-k", type=int, default=1, help="smallest top-k a layer may route to (default 1)")
    s.add_argument("--min-tokens-per-s", type=float, default=None,
                   help="decode speed floor under the profiled bandwidth")
    s.add_argument("--expert-weight", type=float, default=None,
                   help="nats for dropping a layer's whole proxy mass (default: fitted to the profile's prune costs)")
    s.add_argument("--importance-alpha", type=float, default=0.5, help="a in I = a f + (1-a) s (default 0.5)")
    s.add_argument("--no-prune-curve", dest="prune_curve", action="store_false",
                   help="ignore the profile's prune curves (experts.prune_curve) and price pruning by single-expert "
                        "costs alone (ablation)")
    s.add_argument("--retain-ratio", type=float, default=0.75,
                   help="sequential baseline: fraction of experts and k kept")
    s.add_argument("--mix", default="Q4_K_M",
                   help="llamacpp_mix baseline: llama-quantize's mix, Q4_K_M (default), Q3_K_M, Q2_K, IQ2_XXS, IQ1_M "
                        "or IQ1_S (its types must be among the candidate formats)")
    s.add_argument("--time-limit", type=float, default=60.0, help="seconds (default 60)")
    s.add_argument("--gap", type=float, default=1e-4, help="relative optimality gap to prove (default 1e-4 = 0.01%%)")
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-accelerate", action="store_true", help="skip the Lagrangian warm start and certificate")
    s.add_argument("--no-presolve", action="store_true", help="keep dominated formats in the model")
    s.add_argument("--reproducible", action="store_true", help="leave timings out of the plan (byte-identical reruns)")
    s.add_argument("--json", action="store_true", help="print a JSON summary instead of tables")

    f = sub.add_parser("pareto", help="the loss-vs-decode-speed frontier at a budget (table, CSV, JSON, PNG)")
    _add_budget_arguments(f, "directory for pareto.csv/.json/.png (default pareto)", "pareto")
    f.add_argument("--formulation", default="importance", help="objective (see `python -m optimizer objectives`)")
    f.add_argument("--points", type=int, default=8, help="speed floors between the optimum's speed and the fastest "
                   "(default 8)")

    e = sub.add_parser("explain", help="summarise a plan (bytes by kind, experts and k per layer, formats)")
    e.add_argument("plan")
    e.add_argument("--json", action="store_true")

    sub.add_parser("objectives", help="list the registered objectives")
    sub.add_parser("devices", help="list the --device presets (published memory bandwidths, with sources)")

    x = sub.add_parser("example",
                       help="build the bundled DeepSeek-V3 profile (real routing statistics, prior sensitivities), "
                            "or a prior profile of any supported MoE config (--config)")
    x.add_argument("-o", "--output", default="examples/deepseek-v3/profile.json.gz")
    x.add_argument("--config", default=None,
                   help="a model's config.json (transformers or DeepSeek's reference format): a profile from the "
                        "documented prior, to plan and size the model before downloading it")
    x.add_argument("--scores", default=None, help="with --config: per-layer routing statistics (JSON, as "
                   "optimizer/data/deepseek_v3/expert_scores_seqlen_8k.json); default: equal shares")
    x.add_argument("--name", default=None, help="with --config: the model name recorded in the profile")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # -h, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return _run(args)
    except (InputError, InfeasibleError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
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
    if args.command == "devices":
        from .devices import render_presets

        print(render_presets())
        return 0
    if args.command == "explain":
        from .plan import load_plan

        plan = load_plan(args.plan)
        print(json.dumps(report.plan_summary(plan), indent=1) if args.json else report.render_plan(plan))
        return 0
    if args.command == "example":
        return _example(args)
    if args.command == "pareto":
        return _pareto(args)
    return _solve(args)


def _pareto(args: argparse.Namespace) -> int:
    from .budget import make_budget, parse_bytes
    from .devices import load_device
    from .formulation.instance import FormulationOptions
    from .formulation.objectives import get_objective
    from .pareto import render_frontier, speed_frontier, write_frontier
    from .profile import load_profile

    get_objective(args.formulation)
    check_range(args.points, "--points", 1, 100)
    check_range(args.context, "--context", 0, 2**31 - 1)
    overhead = parse_bytes(args.overhead, "--overhead", minimum=0)
    device = load_device(args.device) if args.device is not None else None
    profile = load_profile(args.profile)
    if device is not None:
        profile = replace(profile, device=device)
    budget = make_budget(profile.architecture, args.budget, args.context, overhead)
    rows = speed_frontier(profile, budget, FormulationOptions(objective=args.formulation), args.points)
    print(render_frontier(rows))
    for path in write_frontier(rows, Path(args.output), f"{profile.model.name} at {args.budget}"):
        print(f"wrote {path}")
    return 0


def _solve(args: argparse.Namespace) -> int:
    from . import report
    from .baselines import BaselineOptions
    from .budget import make_budget
    from .devices import load_device
    from .formulation.instance import FormulationOptions
    from .formulation.objectives import ObjectiveOptions, get_objective
    from .llamacpp_mixes import check_mix
    from .plan import Target, save_plan
    from .profile import load_profile
    from .solve import SolveOptions, optimize
    from .solvers.registry import solver_names

    if args.solver not in solver_names():
        raise InputError(f"--solver: unknown {args.solver!r}; choose from {', '.join(solver_names())}")
    get_objective(args.formulation)
    mix = check_mix(args.mix)
    total, overhead, formats = _check_solve_flags(args)  # all before the profile is read
    device = load_device(args.device) if args.device is not None else None
    out = check_output_path(args.output, "-o")
    started = time.perf_counter()  # --time-limit covers reading the profile too
    profile = load_profile(args.profile)
    if device is not None:
        profile = replace(profile, device=device)
    if args.target == "llamacpp":
        _check_llamacpp_formats(formats or profile.sensitivity.formats)
    budget = make_budget(profile.architecture, total, args.context, overhead)
    formulation = FormulationOptions(
        objective=args.formulation,
        objective_options=ObjectiveOptions(importance_alpha=args.importance_alpha, expert_weight=args.expert_weight,
                                           prune_curve=args.prune_curve),
        target=Target(args.target), formats=formats, min_experts=args.min_experts, min_top_k=args.min_top_k,
        min_tokens_per_s=args.min_tokens_per_s, presolve=not args.no_presolve,
    )
    options = SolveOptions(
        started=started, solver=args.solver, time_limit=args.time_limit, rel_gap=args.gap, threads=args.threads,
        seed=args.seed, accelerate=not args.no_accelerate, reproducible=args.reproducible,
        baseline=BaselineOptions(retain_ratio=args.retain_ratio, importance_alpha=args.importance_alpha, mix=mix),
        device=args.device,
    )
    plan = optimize(profile, budget, formulation, options)
    save_plan(plan, out)
    if args.json:
        print(json.dumps({**report.plan_summary(plan), "output": str(out)}, indent=1))
    else:
        print(report.render_plan(plan))
        print(f"wrote {out}")
    return 0


def _example(args: argparse.Namespace) -> int:
    from .examples.deepseek_v3 import build_deepseek_v3_profile, build_prior_profile
    from .jsonio import read_json
    from .profile import save_profile

    check_output_path(args.output, "-o")
    if args.config is None:
        if args.scores or args.name:
            raise InputError("--scores and --name need --config (without it the bundled DeepSeek-V3 profile is built)")
        profile = build_deepseek_v3_profile()
    else:
        config = read_json(args.config)[0]
        if not isinstance(config, dict):
            raise InputError(f"--config: {args.config} is not a JSON object")
        scores = read_json(args.scores)[0] if args.scores else None
        name = args.name or config.get("_name_or_path") or Path(args.config).parent.name or "model"
        profile = build_prior_profile(config, str(name), scores, source=f"config {args.config}",
                                      where=str(args.config))
    digest = save_profile(profile, args.output)
    print(f"wrote {args.output} ({digest}): {profile.architecture.family}, "
          f"{profile.architecture.num_parameters / 1e9:.2f}B parameters, {len(profile.architecture.moe_layers)} MoE "
          f"layers; costs are a documented prior, not measured")
    return 0


def _check_llamacpp_formats(candidates: tuple[str, ...]) -> None:
    """``--target llamacpp`` plans must be storable by llama.cpp: no moecc runtime (int) format among the
    candidates; the message names the command that gives a profile GGUF types."""
    from .formats import GGUF_FAMILY, INT_FAMILY, get_format

    runtime_only = [f for f in candidates if get_format(f).family == INT_FAMILY]
    if not runtime_only:
        return
    gguf = [f for f in candidates if get_format(f).family == GGUF_FAMILY]
    hint = (f"restrict this solve to them with --formats {','.join(gguf)}" if any(get_format(f).quantized for f in gguf)
            else "profile with GGUF types: `python -m profiling run --model DIR --target llamacpp -o profile.json`")
    raise InputError(f"--target llamacpp: {', '.join(runtime_only)} are moecc runtime formats that llama.cpp cannot "
                     f"store; {hint}")


def _check_solve_flags(args: argparse.Namespace) -> tuple[int, int, tuple[str, ...] | None]:
    """Every numeric flag finite and in range; returns the budget and overhead in bytes and the ``--formats``."""
    check_range(args.time_limit, "--time-limit", 0, MAX_TIME_LIMIT_S, open_low=True)
    check_range(args.gap, "--gap", 0, MAX_GAP, open_low=True)
    check_range(args.threads, "--threads", 1, MAX_THREADS)
    check_range(args.seed, "--seed", 0, MAX_SEED)
    check_range(args.context, "--context", 0, MAX_CONTEXT)
    check_range(args.min_experts, "--min-experts", 0, MAX_EXPERTS)
    check_range(args.min_top_k, "--min-top-k", 1, MAX_EXPERTS)
    if args.min_tokens_per_s is not None:
        check_range(args.min_tokens_per_s, "--min-tokens-per-s", 0, MAX_TOKENS_PER_S, open_low=True)
    if args.expert_weight is not None:
        check_range(args.expert_weight, "--expert-weight", 0, MAX_COST_NATS)
    check_range(args.importance_alpha, "--importance-alpha", 0, 1)
    check_range(args.retain_ratio, "--retain-ratio", 0, 1, open_low=True)
    total = parse_bytes(args.budget, "--budget")
    overhead = parse_bytes(args.overhead, "--overhead", minimum=0)
    formats = None
    if args.formats is not None:
        formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
        if not formats:
            raise InputError(f"--formats: no candidate formats in {args.formats[:40]!r}")
        for name in formats:
            try:
                get_format(name)
            except ValueError as exc:  # InputError, or int() of a 5000-digit group size
                raise InputError(f"--formats: {exc}") from None
    return total, overhead, formats


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
