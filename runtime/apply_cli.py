"""``python -m runtime apply PLAN --model DIR -o OUT [--method rtn|hqq|gptq]``: write a compressed checkpoint.

``--method gptq`` calibrates first: ``--data`` (default ``english:calibration``) and ``--calib-tokens``
(default 2048) choose the text the model runs on to collect each block's input Hessian, layer by layer on
the progressively quantized model (``--calib-one-pass``: all from the original model in one pass).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from optimizer.budget import parse_bytes
from optimizer.errors import InputError

from .apply import DEFAULT_SHARD_BYTES, ByteCountError, apply_plan
from .calibration import DEFAULT_CALIB_TOKENS, DEFAULT_DATA
from .quant import CALIBRATED_METHODS, METHODS


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    """Apply the plan and print the byte report; bad input -> one line on stderr, exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="notice: %(message)s")

    def progress(done: int, total: int, name: str) -> None:
        if not args.quiet and (done == total or done % max(1, total // 20) == 0):
            print(f"  {done}/{total} {name}", file=sys.stderr)

    try:
        if args.method not in CALIBRATED_METHODS and (args.data is not None or args.calib_tokens is not None
                                                      or args.calib_one_pass):
            raise InputError(f"--data, --calib-tokens and --calib-one-pass apply to --method "
                             f"{'/'.join(CALIBRATED_METHODS)} only")
        report = apply_plan(args.plan, args.model, args.out, args.method, parse_bytes(args.shard_size, "--shard-size"),
                            args.overwrite, progress, data=args.data or DEFAULT_DATA,
                            calib_tokens=DEFAULT_CALIB_TOKENS if args.calib_tokens is None else args.calib_tokens,
                            calib_progress=not args.quiet, sequential=not args.calib_one_pass)
    except (InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ByteCountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"out": str(report.out), "weight_bytes": report.weight_bytes, "plan_bytes": report.plan_bytes,
                          "relative_diff": report.relative_diff, "native": report.native, "mapped": report.mapped,
                          "file_bytes": report.file_bytes, "blocks": report.blocks, "shards": report.shards,
                          "skipped": len(report.skipped), "notes": report.notes}))
    else:
        print("\n".join(report.lines()))
    return 0
