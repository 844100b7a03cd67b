"""``python -m runtime eval MODEL [--reference ORIGINAL] ...``: score a model on a corpus split.

A checkpoint directory (``save_pretrained`` or ``runtime apply`` output) is scored in PyTorch by
:func:`runtime.evaluate.evaluate` (perplexity, bits per byte, and with ``--reference`` the KL divergence to the
original); a ``.gguf`` file is scored in llama.cpp by :func:`runtime.gguf_eval.evaluate_gguf`
(``llama-perplexity --kl-divergence`` against the original's GGUF, decode speed from ``llama-bench``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from optimizer.errors import InputError, error_line

from .corpora import CORPORA, SPLITS
from .evaluate import DEFAULT_WINDOW, evaluate
from .gguf_eval import evaluate_gguf, format_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


def run(args: argparse.Namespace) -> int:
    """Evaluate and print; bad input -> one line on stderr, exit code 2 (a ``.gguf`` goes to llama.cpp)."""
    if args.model_dir.suffix.lower() == ".gguf" or args.model_dir.is_file():
        return _run_gguf(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = evaluate(args.model_dir, args.corpus, args.split, args.max_tokens, args.window,
                       args.batch_size, progress=not args.no_progress, reference=args.reference)
    except InputError as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
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


def _run_gguf(args: argparse.Namespace) -> int:
    """``runtime eval model.gguf``: llama.cpp's KL divergence and decode speed (:mod:`runtime.gguf_eval`)."""
    try:
        res = evaluate_gguf(args.model_dir, args.reference, args.corpus, args.split, args.max_tokens, args.window,
                            args.llama_cpp, args.threads, bench=not args.no_bench, cache=args.reference_cache)
    except InputError as exc:
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:  # a llama.cpp step failed: the message ends with its log's tail
        print(f"error: {error_line(exc)}", file=sys.stderr)
        return 1
    print(res.to_json() if args.json else format_result(res))
    return 0
