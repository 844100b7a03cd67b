"""Perplexity / bits-per-byte evaluation over fixed non-overlapping windows.

The corpus split is tokenised once; window ``i`` feeds tokens
``[i*W, (i+1)*W)`` and scores the next token at each position, so every token
after the first is predicted exactly once, with a context that restarts at each
window boundary.  Deterministic: no sampling, no shuffling, float32 on CPU.

    python -m runtime eval MODEL_DIR [--split test] [--corpus english] [--max-tokens N] [--window 512]

The default window is ``min(512, config.max_position_embeddings)``: the models
trained here store their training context there (RoPE does not extrapolate).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from optimizer.errors import InputError

from .byte_tokenizer import is_byte_model
from .checkpoint import load_pretrained
from .corpora import CORPORA, SPLITS, load_corpus
from .load import is_compressed, load


DEFAULT_WINDOW = 512


class EvalError(InputError):
    """Bad evaluation input (not a model directory, too little text, bad window)."""


@dataclass(frozen=True)
class EvalResult:
    """Outcome of one evaluation; ``bits_per_byte`` counts UTF-8 bytes of the scored text."""

    model: str
    corpus: str
    split: str
    window: int
    windows: int
    tokens: int
    bytes: int
    nll: float
    perplexity: float
    bits_per_token: float
    bits_per_byte: float
    byte_tokenizer: bool
    forward_seconds: float
    tokens_per_second: float

    def to_json(self) -> str:
        """One-line JSON of the result."""
        return json.dumps(asdict(self))


def load_model(model_dir: str | Path):
    """float32 CPU model from a ``save_pretrained`` directory (safetensors only, see
    :func:`runtime.checkpoint.load_pretrained`) or a ``runtime apply`` output (pruned and quantized experts
    are rebuilt by :func:`runtime.load.load`); raises :class:`InputError` (:class:`EvalError` if ``model_dir``
    is not a model directory)."""
    path = Path(model_dir)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise EvalError(f"{path} is not a model directory (no config.json)")
    return load(path) if is_compressed(path) else load_pretrained(path)


def _tokenize(model_dir: Path | None, text: str) -> tuple[list[int], bool, Any]:
    """Token ids of ``text``, whether the tokenizer is bytes, and the HF tokenizer (or None)."""
    if model_dir is None or is_byte_model(model_dir):
        return list(text.encode("utf-8")), True, None
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise EvalError(f"{model_dir} has no byte_tokenizer.json and no loadable tokenizer: {exc}") from exc
    return tok(text, add_special_tokens=False)["input_ids"], False, tok


def _read_text(corpus: str, split: str) -> str:
    """Corpus split text; ``corpus`` may also be a path to a UTF-8 text file."""
    if corpus not in CORPORA and Path(corpus).is_file():
        return Path(corpus).read_text(encoding="utf-8", errors="replace")
    return load_corpus(corpus, split)


@torch.no_grad()
def evaluate(model_or_dir: Any, corpus: str = "english", split: str = "test",
             max_tokens: int | None = None, window: int | None = None, batch_size: int = 8,
             progress: bool = False) -> EvalResult:
    """Score ``corpus``/``split`` with a model object or a model directory.

    A model object is assumed to read bytes unless it carries a ``config._name_or_path``
    directory with a tokenizer.  ``max_tokens`` caps the number of scored tokens
    (rounded down to whole windows; one shorter window if it is below ``window``).
    ``window`` defaults to ``min(512, config.max_position_embeddings)`` (the trained context).
    """
    if window is not None and window < 1:
        raise EvalError(f"window must be positive, got {window}")
    text = _read_text(corpus, split)  # validate the corpus before the (slower) model load
    if isinstance(model_or_dir, (str, Path)):
        model_dir: Path | None = Path(model_or_dir)
        model = load_model(model_dir)
    else:
        model = model_or_dir
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        model_dir = Path(name) if name and Path(name).is_dir() else None
    ids, byte_tok, tok = _tokenize(model_dir, text)
    if len(ids) < 2:
        raise EvalError(f"corpus {corpus!r} split {split!r} has fewer than 2 tokens")
    limit = getattr(model.config, "max_position_embeddings", None)
    if window is None:
        window = min(DEFAULT_WINDOW, limit or DEFAULT_WINDOW)
    if limit and window > limit:
        raise EvalError(f"window {window} exceeds the model's max_position_embeddings {limit}")
    n_windows = (len(ids) - 1) // window
    if max_tokens is not None:
        if max_tokens < 1:
            raise EvalError(f"max_tokens must be positive, got {max_tokens}")
        if max_tokens < window:
            window, n_windows = max_tokens, 1
        else:
            n_windows = min(n_windows, max_tokens // window)
    if n_windows == 0:  # text shorter than one window: a single short window
        window, n_windows = len(ids) - 1, 1
    data = torch.tensor(ids[: n_windows * window + 1], dtype=torch.long)
    inputs = data[:-1].view(n_windows, window)
    targets = data[1:].view(n_windows, window)
    nll, fwd = 0.0, 0.0
    from tqdm.auto import tqdm

    bar = tqdm(total=n_windows * window, unit="tok", disable=not progress, desc="eval")
    for start in range(0, n_windows, batch_size):
        x = inputs[start:start + batch_size]
        t0 = time.perf_counter()
        logits = model(input_ids=x).logits
        fwd += time.perf_counter() - t0
        nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                               targets[start:start + batch_size].reshape(-1), reduction="sum").item()
        bar.update(x.numel())
    bar.close()
    n_tok = n_windows * window
    if byte_tok:
        n_bytes = n_tok
    else:
        n_bytes = len(tok.decode(ids[1:n_windows * window + 1]).encode("utf-8"))
    return EvalResult(
        model=str(model_dir) if model_dir else type(model).__name__, corpus=corpus, split=split,
        window=window, windows=n_windows, tokens=n_tok, bytes=n_bytes, nll=nll / n_tok,
        perplexity=math.exp(nll / n_tok), bits_per_token=nll / n_tok / math.log(2),
        bits_per_byte=nll / max(1, n_bytes) / math.log(2), byte_tokenizer=byte_tok,
        forward_seconds=fwd, tokens_per_second=n_tok / fwd if fwd > 0 else float("nan"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m runtime eval``."""
    parser.add_argument("model_dir", type=Path, help="directory written by save_pretrained")
    parser.add_argument("--corpus", default="english", help=f"{' / '.join(CORPORA)} or a text file")
    parser.add_argument("--split", default="test", choices=SPLITS)
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--window", type=int, default=None,
                        help=f"tokens per window (default: min({DEFAULT_WINDOW}, model max_position_embeddings))")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead of a table")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Evaluate and print; bad input -> one line on stderr, exit code 2."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        res = evaluate(args.model_dir, args.corpus, args.split, args.max_tokens, args.window,
                       args.batch_size, progress=not args.no_progress)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(res.to_json())
        return 0
    print(f"model        {res.model}\ncorpus       {res.corpus}/{res.split} "
          f"({res.windows} windows x {res.window} tokens = {res.tokens:,} tokens, {res.bytes:,} bytes)\n"
          f"perplexity   {res.perplexity:.4f}\nbits/token   {res.bits_per_token:.4f}\n"
          f"bits/byte    {res.bits_per_byte:.4f}{'' if res.byte_tokenizer else ' (decoded bytes)'}\n"
          f"forward      {res.tokens_per_second:,.0f} tokens/s ({res.forward_seconds:.1f} s)")
    return 0
