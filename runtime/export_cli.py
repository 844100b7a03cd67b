"""``python -m runtime export PLAN --to gguf|llamacpp|gptqmodel|torchao -o OUT``: the command line of
:mod:`runtime.export` (recipes) and :mod:`runtime.gguf_export` (the checked GGUF)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from optimizer.errors import InputError, error_line

from .export import CHECKPOINT_DIR, TARGETS, export
from .gguf_export import GGUFCheckError, export_gguf

#: every ``--to``: ``gguf`` and the recipe targets
CLI_TARGETS = ("gguf", *TARGETS)


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    """Write the recipe or the GGUF; bad input or an inexpressible plan -> one line on stderr, exit code 2;
    a failed llama.cpp step or a GGUF that differs from the plan -> one line, exit code 1."""
    if args.to == "gguf":
        if args.pruned_checkpoint is not None:
            print("error: --pruned-checkpoint: not for --to gguf (the pruned checkpoint is always made)",
                  file=sys.stderr)
            return 2
        try:
            export_gguf(args.plan, args.model, args.out, args.llama_cpp, args.calibration_text, args.threads,
                        args.overwrite, args.keep_work)
        except (InputError, OSError) as exc:
            print(f"error: {error_line(exc)}", file=sys.stderr)
            return 2
        except (GGUFCheckError, RuntimeError) as exc:
            print(f"error: {error_line(exc)}", file=sys.stderr)
            return 1
        print(f"wrote {args.out}")
        return 0
    for flag in ("llama_cpp", "calibration_text", "threads"):
        if getattr(args, flag) is not None:
            print(f"error: --{flag.replace('_', '-')}: only for --to gguf", file=sys.stderr)
            return 2
    try:
        paths = export(args.plan, args.to, args.out, args.model, args.pruned_checkpoint, args.overwrite)
    except (InputError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for p in paths:
        print(f"wrote {p}")
    return 0
