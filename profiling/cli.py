"""Command line: ``python -m profiling run | validate | calibrate | prune-curve | fit-prediction | refine |
compare-domains | memory | inspect | refit | gguf-columns | device``
(docs/profiling.md).

Bad input (not a supported MoE directory, an empty corpus, a format the model's shapes cannot take, a
malformed profile, a flag out of range) prints one line ``error: ...`` on stderr and exits with code 2.
Numeric flags are checked against :data:`INT_FLAGS` (and ``--keep``) and output paths for writability
before torch is imported or any model is read. Profiles go through the bounded reader of
:mod:`optimizer.jsonio`; a ``.details.json`` read without it that is too deep or too large still ends in one
line (RecursionError, MemoryError and OverflowError are caught as well).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from optimizer.cli import MAX_SEED, MAX_THREADS, OneLineParser, check_range
from optimizer.errors import InfeasibleError, InputError, error_line
from optimizer.formats import GGUF_FAMILY, LLAMACPP_DEFAULT_FORMATS, get_format
from optimizer.jsonio import check_output_path
from optimizer.model_spec import MAX_BLOCKS, MAX_EXPERTS
from optimizer.plan import Target

#: (smallest, largest) value of every integer flag, by argparse destination; a flag left at None keeps its
#: automatic default. ``docs/profiling.md`` describes the flags.
INT_FLAGS: dict[str, tuple[int, int]] = {
    "max_tokens": (1, 2**31 - 1),
    "window": (1, 2**20),
    "batch_size": (1, 2**16),
    "seed": (0, MAX_SEED),
    "prune_per_layer": (1, MAX_EXPERTS),
    "measure_blocks": (1, MAX_BLOCKS),
    "state_budget_mib": (1, 2**20),
    "device_repeats": (1, 1000),
    "threads": (1, MAX_THREADS),
    "plans": (3, 10**4),
    "rounds": (0, 100),
    "repeats": (1, 1000),
}
#: fit-prediction's random plans and their seed (validate draws its own with seed 0: those stay held out).
DEFAULT_PLANS, DEFAULT_SEED = 20, 1
#: argparse destinations of the paths a command writes, with their flags.
OUTPUT_FLAGS = {"output": "-o", "json": "--json", "profile_out": "--profile-out", "log": "--log"}


def _add_run(sub) -> None:
    p = sub.add_parser("run", help="measure a model and write profile.json (+ profile.details.json)")
    p.add_argument("--model", type=Path, required=True, help="save_pretrained directory of a supported MoE")
    p.add_argument("--data", default="english:calibration",
                   help="CORPUS[:SPLIT] (english|code, split train|calibration|test; default calibration) "
                        "or a text file")
    p.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--window", type=int, default=256, help="tokens per window (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward batch")
    p.add_argument("--formats", nargs="+", default=None,
                   help="candidate formats (default: int{2,3,4,5,6,8}_g<largest fitting group> and BF16; with "
                        f"--target llamacpp: {' '.join(LLAMACPP_DEFAULT_FORMATS)}, those the model's rows admit)")
    p.add_argument("--target", choices=[t.value for t in Target], default=Target.HF.value,
                   help="who runs the plans: moecc's runtime (hf, int formats) or llama.cpp (GGUF types, for "
                        "`optimizer solve --target llamacpp`); chooses the default --formats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--streamed", action="store_true", help="hold one decoder layer's weights in memory at a time")
    p.add_argument("--quant-method", choices=("rtn", "hqq"), default="rtn", help="runtime.quant method")
    p.add_argument("--prune-per-layer", type=int, default=None,
                   help="experts per layer whose prune cost is measured (default: all when <= 512 experts in all, "
                        "else 16, stratified by routing mass)")
    p.add_argument("--measure-blocks", type=int, default=None,
                   help="blocks whose sensitivity is measured (default: all when <= 600 blocks, else 300 sampled)")
    p.add_argument("--measure", default="prune,topk,sensitivity,device",
                   help="comma list of measured sections (prune,topk,sensitivity,device) or 'none'; routing "
                        "statistics and the proxy are always computed")
    p.add_argument("--cost", choices=("kl", "nll"), default="kl",
                   help="measured effect written as prune cost and sensitivity (and fitted by the proxy): mean "
                        "per-token KL to the original model (default; robust) or the NLL increase (clipped at 0)")
    p.add_argument("--state-budget-mib", type=int, default=None,
                   help="memory for the hidden states of perturbations propagated together (default 128 MiB; "
                        "streamed 512 MiB: bigger chunks mean fewer layer reloads)")
    p.add_argument("--device-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: profiling runs many small forwards, and on a shared machine "
                        "OpenMP threads wait for each other; raise it on a dedicated one)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: reuse the effects in OUTPUT.journal.jsonl (same settings)")
    p.add_argument("-o", "--output", type=Path, default=Path("profile.json"))


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="additivity check: predicted vs measured loss of random mixed plans")
    p.add_argument("profile", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--plans", type=int, default=20)
    p.add_argument("--data", default=None, help="calibration text (default: the profile's own)")
    p.add_argument("--max-tokens", type=int, default=None, help="default: the profile's token count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--no-uniform", action="store_true",
                   help="skip the uniform-format plans (one per quantized candidate) added to the random ones")
    p.add_argument("--no-progress", action="store_true")


def _add_domains(sub) -> None:
    p = sub.add_parser("compare-domains", help="how different the kept experts of two profiles are")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--keep", type=float, default=0.5, help="fraction of each layer's experts kept (default 0.5)")
    p.add_argument("--json", type=Path, default=None)


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="correlations of the proxies with the measured single-block/expert effects")
    p.add_argument("profile", type=Path)


def _add_refit(sub) -> None:
    p = sub.add_parser("refit", help="refill the fitted proxy cells of a profile from its details file (no measuring)")
    p.add_argument("profile", type=Path)
    p.add_argument("-o", "--output", type=Path, default=None, help="write here (default: rewrite PROFILE in place)")
    p.add_argument("--rule", choices=("group_format", "group"), default="group_format",
                   help="proxy scale per (group, format) (default) or per group")
    p.add_argument("--proxy-only", action="store_true",
                   help="the fitted proxy replaces measured cells too (measurements only set the scales)")


def _add_gguf_columns(sub) -> None:
    p = sub.add_parser("gguf-columns", help="give an int-format profile proxy GGUF columns (for --target llamacpp), "
                       "no measuring")
    p.add_argument("profile", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)


def _add_refine(sub) -> None:
    p = sub.add_parser("refine", help="closed loop: measure the ILP's plans and the baselines at a budget, correct "
                       "the profile, hand over the best measured plan")
    p.add_argument("profile", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--budget", required=True, help="memory budget, as for `optimizer solve` (e.g. 4MB, 120GiB)")
    p.add_argument("--context", type=int, default=8192, help="tokens of KV cache to reserve (default 8192)")
    p.add_argument("--overhead", default="2GiB", help="runtime overhead to reserve (default 2GiB)")
    p.add_argument("--rounds", type=int, default=3, help="correct-and-re-solve rounds (default 3)")
    p.add_argument("--data", default=None, help="calibration text (default: the profile's own)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="calibration tokens (default: the profile's, at least 4096)")
    p.add_argument("--window", type=int, default=None, help="default: the profile's")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("-o", "--output", type=Path, default=Path("plan.json"), help="the handed-over plan")
    p.add_argument("--profile-out", type=Path, default=None, help="also write the corrected profile here")
    p.add_argument("--log", type=Path, default=None, help="also write every measured plan's record here (JSON)")
    p.add_argument("--also", type=Path, action="append", default=[], metavar="PROFILE",
                   help="another profile of the same model whose ILP plan is measured as a candidate too (repeat "
                        "for more; a calibrated profile's single-effect source is added by itself)")
    p.add_argument("--no-progress", action="store_true")


def _measuring_profile_command(sub, name: str, help_text: str, output_help: str) -> argparse.ArgumentParser:
    """A command that measures on a profile's own calibration windows and writes a new profile (journaled)."""
    p = sub.add_parser(name, help=help_text)
    p.add_argument("profile", type=Path)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("-o", "--output", type=Path, required=True, help=output_help)
    p.add_argument("--max-tokens", type=int, default=None, help="calibration tokens (default: the profile's)")
    p.add_argument("--resume", action="store_true", help="reuse the measurements journaled by an interrupted run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _add_calibrate(sub) -> None:
    p = _measuring_profile_command(sub, "calibrate", "price formats from measured whole plans (uniform, per group, "
                                   "per layer) and write the calibrated profile",
                                   "the calibrated profile (+ its details file)")
    p.add_argument("--layer-probe", default="auto",
                   help="format each decoder layer is measured alone in (default auto: the 3-bit candidate, else the "
                   "second smallest; 'none': no layer factors)")
    p.add_argument("--no-format-correction", action="store_true",
                   help="no per-format factors (uniform plans then need not be predicted exactly)")
    p.add_argument("--keep-fixed-cells", action="store_true",
                   help="keep the single-block cells of uncalibrated blocks that have one candidate format (the "
                   "behaviour before they were priced 0; reproduces profiles calibrated then)")


def _add_prune_curve(sub) -> None:
    p = _measuring_profile_command(sub, "prune-curve", "measure per layer the cost of pruning n experts together "
                                   "(a curve in n) and write the profile with experts.prune_curve",
                                   "the profile with prune curves (+ details file)")
    p.add_argument("--counts", type=int, nargs="+", default=None,
                   help="experts pruned together per measured point (default: E/8, E/4, E/2, 3E/4, E-1 per layer)")
    p.add_argument("--ranking", default=None,
                   help="objective whose drop costs rank the experts (default predicted_loss, the measured singles; "
                   "routing_mass without them)")


def _add_fit_prediction(sub) -> None:
    p = _measuring_profile_command(sub, "fit-prediction", "measure whole plans and fit what the objective means in "
                                   "KL (KL ~ a O^q); write the profile with it", "the profile with prediction")
    p.add_argument("--plans", type=int, default=DEFAULT_PLANS,
                   help=f"random mixed plans to measure, besides one uniform plan per format (default {DEFAULT_PLANS})")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"seed of the random plans (default {DEFAULT_SEED}; validate's default 0 then stays held out)")


def _add_memory(sub) -> None:
    p = sub.add_parser("memory", help="peak RSS of the reference pass, in memory vs streamed (two child processes)")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--data", default="english:calibration")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=1)


def _add_device(sub) -> None:
    p = sub.add_parser("device", help="measure this machine: memory bandwidth and each format's dequantize+matmul "
                                      "throughput; optionally put them into a profile")
    p.add_argument("--formats", nargs="+", default=None,
                   help="formats to time (default: the --profile's candidates, else int{2,3,4,5,6,8}_g64 and BF16)")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per measurement (median)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--profile", type=Path, default=None,
                   help="a profile whose device section is replaced by this measurement (needs -o)")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="where the updated --profile is written; without --profile, a device JSON for "
                        "`optimizer solve --device FILE`")
    p.add_argument("--json", dest="print_json", action="store_true", help="print the measurement as one JSON line")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m profiling", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_validate(sub)
    _add_domains(sub)
    _add_memory(sub)
    _add_inspect(sub)
    _add_refit(sub)
    _add_gguf_columns(sub)
    _add_refine(sub)
    _add_calibrate(sub)
    _add_prune_curve(sub)
    _add_fit_prediction(sub)
    _add_device(sub)
    return parser


def _cmd_run(args) -> int:
    from .report import print_summary
    from .run import RunOptions, run_profile

    measure = [] if args.measure.strip() == "none" else [s.strip() for s in args.measure.split(",") if s.strip()]
    opts = RunOptions(model=args.model, data=args.data, output=args.output, max_tokens=args.max_tokens,
                      window=args.window, batch_size=args.batch_size, formats=args.formats, seed=args.seed,
                      streamed=args.streamed, method=args.quant_method, prune_per_layer=args.prune_per_layer,
                      measure_blocks=args.measure_blocks, measure=measure, device_repeats=args.device_repeats,
                      cost=args.cost,
                      state_budget_mib=args.state_budget_mib,
                      progress=not args.no_progress, resume=args.resume, target=args.target)
    res = run_profile(opts)
    print_summary(res.profile, res.details)
    print(f"wrote {res.profile_path} and {res.details_path}")
    return 0


def _cmd_validate(args) -> int:
    from .validate import print_validation, validate

    res = validate(args.profile, args.model, plans=args.plans, data=args.data, max_tokens=args.max_tokens,
                   seed=args.seed, progress=not args.no_progress, uniform=not args.no_uniform)
    print_validation(res)
    if args.json:
        from optimizer.jsonio import write_json

        write_json(args.json, res, indent=1)
    return 0


def _cmd_domains(args) -> int:
    from .domains import compare_domains, print_domains

    res = compare_domains(args.a, args.b, keep=args.keep)
    print_domains(res)
    if args.json:
        from optimizer.jsonio import write_json

        write_json(args.json, res, indent=1)
    return 0


def _cmd_refit(args) -> int:
    from .refit import refit

    _, details, out = refit(args.profile, args.output, rule=args.rule, proxy_only=args.proxy_only)
    print(f"refit {details['refit']['cells_changed']} fitted cells; wrote {out} ({details['profile_hash'][:19]}...)")
    return 0


def _cmd_gguf_columns(args) -> int:
    from .gguf_columns import write_gguf_columns

    profile = write_gguf_columns(args.profile, args.output)
    print(f"wrote {args.output} ({', '.join(profile.formats)}; GGUF columns are proxies)")
    return 0


def _cmd_refine(args) -> int:
    from .refine import run_refine

    run_refine(args)
    return 0


def _cmd_calibrate(args) -> int:
    from .calibrate import run_calibrate

    run_calibrate(args)
    return 0


def _cmd_prune_curve(args) -> int:
    from .prune_curve import run_prune_curve

    run_prune_curve(args)
    return 0


def _cmd_fit_prediction(args) -> int:
    from .prediction import print_fit, run_fit_prediction

    print_fit(run_fit_prediction(args), args.output)
    return 0


def _cmd_inspect(args) -> int:
    from .proxy_check import inspect_profile, print_inspection

    print_inspection(inspect_profile(args.profile))
    return 0


def _cmd_device(args) -> int:
    from optimizer.jsonio import write_json
    from optimizer.profile import device_to_json, load_profile, save_profile

    from .device import measure_device

    if args.profile is not None and args.output is None:
        raise InputError("--profile needs -o: where to write the profile with this machine's device section")
    profile = load_profile(args.profile) if args.profile is not None else None
    formats = args.formats or (list(profile.formats) if profile is not None else
                               [f"int{b}_g64" for b in (2, 3, 4, 5, 6, 8)] + ["BF16"])
    names = [get_format(f).name for f in formats]  # InputError for an unknown name, before any timing
    device = measure_device(names, repeats=args.repeats, seed=args.seed)
    if args.print_json:
        print(json.dumps({"memory_bandwidth_bytes_per_s": device.memory_bandwidth_bytes_per_s,
                          "format_throughput": device.format_throughput, "method": device.measurement.method}))
    else:
        print(f"memory bandwidth  {device.memory_bandwidth_bytes_per_s / 1e9:8.2f} GB/s")
        for name, rate in device.format_throughput.items():
            print(f"{name:<17} {rate / 1e9:8.3f} GB/s of weights (dequantize + batch-1 matmul)")
    if profile is not None:
        digest = save_profile(replace(profile, device=device), args.output)
        print(f"wrote {args.output} ({digest}): {args.profile} with this machine's device section")
    elif args.output is not None:
        write_json(args.output, device_to_json(device))
        print(f"wrote {args.output}: this machine's device, for `python -m optimizer solve --device {args.output}`")
    return 0


def _cmd_memory(args) -> int:
    from .memory import compare_memory

    compare_memory(args.model, args.data, args.max_tokens, args.threads)
    return 0


def check_flags(args: argparse.Namespace) -> None:
    """Every numeric flag in range and every output path writable; cheap, before torch or a model is loaded."""
    for dest, (low, high) in INT_FLAGS.items():
        value = getattr(args, dest, None)
        if value is not None:
            check_range(value, "--" + dest.replace("_", "-"), low, high)
    if getattr(args, "keep", None) is not None:
        check_range(args.keep, "--keep", 0, 1, open_low=True)
    for dest, flag in OUTPUT_FLAGS.items():
        if getattr(args, dest, None) is not None:
            check_output_path(getattr(args, dest), flag)
    if getattr(args, "target", None) == Target.LLAMACPP.value and getattr(args, "formats", None):
        _check_gguf_formats(args.formats)


def _check_gguf_formats(names: list[str]) -> None:
    """``run --target llamacpp --formats ...``: every candidate a GGUF type llama.cpp stores."""
    other = [n for n in names if get_format(n).family != GGUF_FAMILY]
    if other:
        raise InputError(f"--target llamacpp: {', '.join(other)} are moecc runtime formats that llama.cpp cannot "
                         f"store; name GGUF types or leave --formats out for {' '.join(LLAMACPP_DEFAULT_FORMATS)}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # -h, or a usage error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    try:
        check_flags(args)
    except InputError as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from runtime.corpora import CorpusError

    try:
        return {"run": _cmd_run, "validate": _cmd_validate, "compare-domains": _cmd_domains,
                "memory": _cmd_memory, "inspect": _cmd_inspect,
                "refit": _cmd_refit, "gguf-columns": _cmd_gguf_columns, "refine": _cmd_refine,
                "calibrate": _cmd_calibrate,
                "prune-curve": _cmd_prune_curve, "fit-prediction": _cmd_fit_prediction,
                "device": _cmd_device}[args.command](args)
    except (InputError, CorpusError, InfeasibleError) as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    except (RecursionError, MemoryError, OverflowError) as exc:  # details files are still read with json.loads
        print(f"error: input too large or too deeply nested ({type(exc).__name__}: {error_line(exc)})", file=sys.stderr)
        return 2
