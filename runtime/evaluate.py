"""Perplexity / bits-per-byte evaluation over fixed non-overlapping windows, and KL divergence to a reference.

    python -m runtime eval MODEL_DIR [--reference ORIGINAL] [--split test] [--corpus english] [--max-tokens N]
                                     [--window 512]

The corpus split is tokenised once; window ``i`` feeds tokens
``[i*W, (i+1)*W)`` and scores the next token at each position, so every token
after the first is predicted exactly once, with a context that restarts at each
window boundary.  Deterministic: no sampling, no shuffling, float32 on CPU.

With ``--reference`` (the uncompressed original) both models run on the same windows and each scored position
adds ``KL(P_ref || P) = sum_v P_ref(v) (log P_ref(v) - log P(v))`` over the vocabulary, in nats; the result
reports its mean, median, p99, p99.9 and max, and the top-1 agreement (same argmax), as llama.cpp's
``llama-perplexity --kl-divergence`` does. This is the protocol of every quality table in the repository
(test split, the model's trained context as the window, the first N tokens).

The default window is ``min(512, config.max_position_embeddings)``: the models
trained here store their training context there (RoPE does not extrapolate).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from optimizer.errors import InputError

from .byte_tokenizer import is_byte_model
from .checkpoint import load_pretrained
from .corpora import CORPORA, load_corpus
from .load import is_compressed, load

DEFAULT_WINDOW = 512


class EvalError(InputError):
    """Bad evaluation input (not a model directory, too little text, bad window)."""


@dataclass(frozen=True)
class EvalResult:
    """Outcome of one evaluation; ``bits_per_byte`` counts UTF-8 bytes of the scored text.

    With a ``reference`` model (:func:`evaluate` ``reference=``), the ``kl_*`` fields are the per-token
    KL divergence KL(P_reference || P_model) of the next-token distributions in nats (mean, median, 99th and
    99.9th percentile, max), ``top1_agreement`` the fraction of tokens whose most likely next token is the
    same in both, and ``reference_perplexity`` the reference's perplexity on the same tokens (llama.cpp's
    ``llama-perplexity --kl-divergence`` reports the same quantities). Without one they are None.
    """

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
    reference: str | None = None
    reference_perplexity: float | None = None
    kl_mean: float | None = None
    kl_median: float | None = None
    kl_p99: float | None = None
    kl_p999: float | None = None
    kl_max: float | None = None
    top1_agreement: float | None = None

    def to_json(self) -> str:
        """One-line JSON of the result."""
        return json.dumps(asdict(self))


@dataclass(frozen=True)
class _Windows:
    """The scored tokens: ``inputs[i]`` predicts ``targets[i]``; ``bytes`` of text they cover."""

    inputs: torch.Tensor
    targets: torch.Tensor
    bytes: int
    byte_tokenizer: bool


def load_model(model_dir: str | Path):
    """float32 CPU model from a ``save_pretrained`` directory (safetensors only, see
    :func:`runtime.checkpoint.load_pretrained`) or a ``runtime apply`` output (pruned and quantized experts
    are rebuilt by :func:`runtime.load.load`); raises :class:`InputError` (:class:`EvalError` if ``model_dir``
    is not a model directory)."""
    path = Path(model_dir)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise EvalError(f"{path} is not a model directory (no config.json)")
    return load(path) if is_compressed(path) else load_pretrained(path)


def load_tokenizer(model_dir: Path | None) -> Any | None:
    """The transformers tokenizer of ``model_dir``; None for a byte-tokenizer model (or no directory)."""
    if model_dir is None or is_byte_model(model_dir):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise EvalError(f"{model_dir} has no byte_tokenizer.json and no loadable tokenizer: {exc}") from None


def tokenize(model_dir: Path | None, text: str) -> list[int]:
    """Token ids of ``text``: its UTF-8 bytes for a byte-tokenizer model, else the directory's tokenizer (no
    special tokens). The one tokenizer path of evaluation, calibration and profiling."""
    return _tokenize(model_dir, text)[0]


def _tokenize(model_dir: Path | None, text: str) -> tuple[list[int], bool, Any]:
    """Token ids of ``text``, whether the tokenizer is bytes, and the HF tokenizer (or None)."""
    tok = load_tokenizer(model_dir)
    if tok is None:
        return list(text.encode("utf-8")), True, None
    return tok(text, add_special_tokens=False)["input_ids"], False, tok


def read_text(corpus: str, split: str) -> str:
    """Corpus split text; ``corpus`` may also be a path to a UTF-8 text file."""
    if corpus not in CORPORA and Path(corpus).is_file():
        return Path(corpus).read_text(encoding="utf-8", errors="replace")
    return load_corpus(corpus, split)


def _model_and_dir(model_or_dir: Any) -> tuple[Any, Path | None]:
    """A model object and the directory its tokenizer is in (None: bytes)."""
    if isinstance(model_or_dir, (str, Path)):
        return load_model(Path(model_or_dir)), Path(model_or_dir)
    name = getattr(getattr(model_or_dir, "config", None), "_name_or_path", "") or ""
    return model_or_dir, (Path(name) if name and Path(name).is_dir() else None)


def _windows(model: Any, model_dir: Path | None, text: str, what: str, max_tokens: int | None,
             window: int | None) -> _Windows:
    """Tokenize ``text`` and cut it into the protocol's windows (see the module docstring)."""
    ids, byte_tok, tok = _tokenize(model_dir, text)
    if len(ids) < 2:
        raise EvalError(f"{what} has fewer than 2 tokens")
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
    n_tok = n_windows * window
    n_bytes = n_tok if byte_tok else len(tok.decode(ids[1:n_tok + 1]).encode("utf-8"))
    return _Windows(data[:-1].view(n_windows, window), data[1:].view(n_windows, window), n_bytes, byte_tok)


def _kl_and_agreement(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token KL(P_ref || P) in nats and whether the top-1 tokens agree."""
    ref_logp = torch.log_softmax(ref_logits.float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1).clamp_min(0.0)
    return kl.reshape(-1), (ref_logits.argmax(-1) == logits.argmax(-1)).reshape(-1)


def _quantile(values: torch.Tensor, q: float) -> float:
    return float(torch.quantile(values.double(), q)) if values.numel() <= 16_000_000 else float("nan")


@torch.no_grad()
def evaluate(model_or_dir: Any, corpus: str = "english", split: str = "test",
             max_tokens: int | None = None, window: int | None = None, batch_size: int = 8,
             progress: bool = False, reference: Any = None) -> EvalResult:
    """Score ``corpus``/``split`` with a model object or a model directory.

    A model object is assumed to read bytes unless it carries a ``config._name_or_path``
    directory with a tokenizer.  ``max_tokens`` caps the number of scored tokens
    (rounded down to whole windows; one shorter window if it is below ``window``).
    ``window`` defaults to ``min(512, config.max_position_embeddings)`` (the trained context).
    ``reference`` (a model object or directory, e.g. the uncompressed original) adds the KL divergence to it
    and the top-1 agreement on the same tokens (see :class:`EvalResult`).
    """
    if window is not None and window < 1:
        raise EvalError(f"window must be positive, got {window}")
    text = read_text(corpus, split)  # validate the corpus before the (slower) model load
    model, model_dir = _model_and_dir(model_or_dir)
    ref, ref_dir = _model_and_dir(reference) if reference is not None else (None, None)
    if ref is not None and ref.config.vocab_size != model.config.vocab_size:
        raise EvalError(f"--reference: vocabulary of {ref.config.vocab_size} tokens != the model's "
                        f"{model.config.vocab_size}; KL needs the same tokenizer")
    w = _windows(model, model_dir, text, f"corpus {corpus!r} split {split!r}", max_tokens, window)
    nll, ref_nll, fwd, kls, agree = 0.0, 0.0, 0.0, [], []
    from tqdm.auto import tqdm

    bar = tqdm(total=w.inputs.numel(), unit="tok", disable=not progress, desc="eval")
    for start in range(0, w.inputs.shape[0], batch_size):
        x, y = w.inputs[start:start + batch_size], w.targets[start:start + batch_size].reshape(-1)
        t0 = time.perf_counter()
        logits = model(input_ids=x).logits
        fwd += time.perf_counter() - t0
        nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y, reduction="sum").item()
        if ref is not None:
            ref_logits = ref(input_ids=x).logits
            ref_nll += F.cross_entropy(ref_logits.float().reshape(-1, ref_logits.shape[-1]), y, reduction="sum").item()
            kl, same = _kl_and_agreement(ref_logits, logits)
            kls.append(kl)
            agree.append(same)
        bar.update(x.numel())
    bar.close()
    n_tok = w.inputs.numel()
    extra: dict[str, Any] = {}
    if ref is not None:
        kl = torch.cat(kls)
        extra = dict(reference=str(ref_dir) if ref_dir else type(ref).__name__,
                     reference_perplexity=math.exp(ref_nll / n_tok), kl_mean=float(kl.double().mean()),
                     kl_median=_quantile(kl, 0.5), kl_p99=_quantile(kl, 0.99), kl_p999=_quantile(kl, 0.999),
                     kl_max=float(kl.max()), top1_agreement=float(torch.cat(agree).double().mean()))
    return EvalResult(
        model=str(model_dir) if model_dir else type(model).__name__, corpus=corpus, split=split,
        window=w.inputs.shape[1], windows=w.inputs.shape[0], tokens=n_tok, bytes=w.bytes, nll=nll / n_tok,
        perplexity=math.exp(nll / n_tok), bits_per_token=nll / n_tok / math.log(2),
        bits_per_byte=nll / max(1, w.bytes) / math.log(2), byte_tokenizer=w.byte_tokenizer,
        forward_seconds=fwd, tokens_per_second=n_tok / fwd if fwd > 0 else float("nan"), **extra)
