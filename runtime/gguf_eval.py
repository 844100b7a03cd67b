"""KL divergence of a GGUF to the original, measured in llama.cpp, and its decode speed.

    python -m runtime eval model.gguf --reference ORIGINAL [--corpus english] [--split test] [--max-tokens N]
                                      [--window 512] [--llama-cpp DIR] [--threads T] [--no-bench] [--json]

This is how llama.cpp's users compare quants (``llama-perplexity --kl-divergence``):

1. the reference GGUF: ``ORIGINAL`` itself when it is a ``.gguf``; for a checkpoint directory, the converter's
   GGUF of it in the checkpoint's precision (F32 when it holds float32 tensors, else BF16), made convertible as
   ``runtime export --to gguf`` makes the pruned one (an untied output head where llama.cpp needs one, zero
   shared-expert gates nudged) and cached in ``--reference-cache`` (default ``cache/gguf-reference``), keyed by
   the checkpoint files' names, sizes and times and the llama.cpp version;
2. ``llama-perplexity -m REFERENCE -f TEXT -c W -b W --chunks N --kl-divergence-base BASE``: the reference's
   log-probabilities on ``N`` windows of ``W`` tokens of the corpus split (cached beside the reference GGUF,
   keyed by the text, ``W`` and ``N``);
3. ``llama-perplexity -m model.gguf --kl-divergence-base BASE --kl-divergence``: per scored token
   ``KL(P_ref || P) = sum_v P_ref(v) (log P_ref(v) - log P(v))`` in nats, reported as mean, median, p99,
   p99.9 and max, with the share of tokens whose most likely next token is the same ("same top p") and both
   perplexities;
4. unless ``--no-bench``: ``llama-bench -p 0 -n G`` on both GGUFs, the decode speed in tokens/s.

The protocol is llama-perplexity's, not ``runtime eval``'s: llama.cpp's tokenizer, a BOS token where the
vocabulary adds one, and only the second half of each window scored (``W - 1 - W/2`` tokens per window, each
with at least ``W/2`` tokens of context), so its numbers are close to but not the same as ``runtime eval
DIR --reference`` on the same split. ``W`` defaults to ``min(512, the GGUF's context_length)`` (as ``runtime eval``
on a checkpoint); ``N`` is ``--max-tokens // W`` (default: every whole window of the split).
The field names of the result are ``runtime eval``'s for the same quantities.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from optimizer.architectures import load_architecture

from .checkpoint import checkpoint_files, read_headers
from .evaluate import DEFAULT_WINDOW, EvalError, read_text
from .export import NEEDS_OUTPUT, gguf_arch
from .gguf_export import check_convertible
from .llamacpp import PINNED_VERSION, LlamaCpp, repo_root, resolve, run_tool
from .prune_checkpoint import converter_config_fixes, is_tied, write_reference_checkpoint, zero_gate_names

GGUF_MAGIC = b"GGUF"
#: decode tokens per llama-bench run, and repetitions
BENCH_TOKENS = 32
BENCH_REPETITIONS = 3
_NUMBER = r"([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf))"
#: the summary lines of ``llama-perplexity --kl-divergence`` (tools/perplexity/perplexity.cpp)
KLD_FIELDS = {
    "perplexity": rf"Mean PPL\(Q\)\s*:\s*{_NUMBER}",
    "reference_perplexity": rf"Mean PPL\(base\)\s*:\s*{_NUMBER}",
    "kl_mean": rf"Mean\s+KLD:\s*{_NUMBER}",
    "kl_max": rf"Maximum KLD:\s*{_NUMBER}",
    "kl_p999": rf"99\.9%\s+KLD:\s*{_NUMBER}",
    "kl_p99": rf"99\.0%\s+KLD:\s*{_NUMBER}",
    "kl_median": rf"Median\s+KLD:\s*{_NUMBER}",
    "top1_agreement": rf"Same top p:\s*{_NUMBER}\s*±",
}


def default_reference_cache() -> Path:
    """Where reference GGUFs and their log-probabilities are kept: ``cache/gguf-reference`` of the repository."""
    return repo_root() / "cache" / "gguf-reference"


@dataclass(frozen=True)
class GGUFEvalResult:
    """Outcome of one llama.cpp evaluation (see the module docstring); KL in nats per scored token.

    ``tokens`` counts the scored tokens (``windows * (window - 1 - window // 2)``). ``decode_tokens_per_second``
    and ``reference_decode_tokens_per_second`` are llama-bench's mean over its repetitions (None with
    ``--no-bench``).
    """

    model: str
    reference: str
    corpus: str
    split: str
    window: int
    windows: int
    tokens: int
    perplexity: float
    reference_perplexity: float
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_p999: float
    kl_max: float
    top1_agreement: float
    engine: str = f"llama.cpp (llama-cpp-python {PINNED_VERSION})"
    protocol: str = "llama-perplexity: second half of each window"
    threads: int = 1
    decode_tokens_per_second: float | None = None
    reference_decode_tokens_per_second: float | None = None
    seconds: float = 0.0

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token, in nats."""
        return math.log(self.perplexity)

    def to_json(self) -> str:
        """One-line JSON of the result."""
        return json.dumps(asdict(self))


def parse_kld_output(text: str) -> dict[str, float]:
    """The summary of a ``llama-perplexity --kl-divergence`` run: the :data:`KLD_FIELDS` values (same top p as a
    fraction) and ``windows`` / ``window``; RuntimeError naming what is missing."""
    values: dict[str, float] = {}
    for name, pattern in KLD_FIELDS.items():
        m = re.search(pattern, text)
        if m:
            values[name] = float(m.group(1))
    m = re.search(r"computing over (\d+) chunks, n_ctx=(\d+)", text)
    if m:
        values["windows"], values["window"] = int(m.group(1)), int(m.group(2))
    missing = [n for n in (*KLD_FIELDS, "windows") if n not in values]
    if missing:
        tail = " | ".join(text.strip().splitlines()[-6:])
        raise RuntimeError(f"llama-perplexity --kl-divergence printed no {', '.join(missing)}: {tail}")
    values["top1_agreement"] /= 100.0
    return values


def parse_bench_json(text: str) -> float:
    """Mean decode tokens/s of a ``llama-bench -o json`` run (its ``n_gen > 0`` test)."""
    try:
        rows = json.loads(text[text.index("["):])
    except ValueError as exc:
        raise RuntimeError(f"llama-bench printed no JSON: {text.strip()[-300:]}") from exc
    speeds = [float(r["avg_ts"]) for r in rows if isinstance(r, dict) and r.get("n_gen", 0) > 0]
    if not speeds:
        raise RuntimeError(f"llama-bench reported no decode test: {text.strip()[-300:]}")
    return speeds[0]


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic."""
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _context_length(path: Path) -> int | None:
    """``{arch}.context_length`` from the GGUF's metadata (the trained context), or None if it has none."""
    import gguf

    try:
        fields = gguf.GGUFReader(str(path)).fields
        arch = fields["general.architecture"].contents()
        return int(fields[f"{arch}.context_length"].contents())
    except (KeyError, ValueError, TypeError, OSError):
        return None


def _chunk_bar(total: int | None, pattern: str, desc: str) -> tuple[Callable[[str], None], Callable[[], None]]:
    """A progress bar of ``total`` windows advanced by the highest window index ``pattern`` finds so far."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="window", desc=desc, disable=not sys.stderr.isatty())
    regex = re.compile(pattern, re.MULTILINE)

    def update(text: str) -> None:
        done = max((int(m.group(1)) for m in regex.finditer(text)), default=0)
        bar.update((done if total is None else min(done, total)) - bar.n)

    return update, bar.close


def _files_key(paths: list[Path], extra: dict) -> str:
    """A short key of files' names, sizes and modification times plus ``extra``."""
    items = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(paths)]
    blob = json.dumps({"files": items, **extra}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def reference_gguf(model_dir: Path, llama: LlamaCpp, cache: Path) -> Path:
    """The cached GGUF of checkpoint ``model_dir`` (see the module docstring, step 1); converted if absent."""
    arch = load_architecture(model_dir)
    check_convertible(arch, model_dir)
    dtypes = {t.dtype for t in read_headers(model_dir)}
    outtype = "f32" if "F32" in dtypes else "bf16"
    key = _files_key(checkpoint_files(model_dir) + [model_dir / "config.json"],
                     {"outtype": outtype, "llama_cpp": PINNED_VERSION})
    out = cache / f"{model_dir.resolve().name}-{outtype}-{key}.gguf"
    if is_gguf(out):
        print(f"[eval] reference GGUF: {out} (cached)", flush=True)
        return out
    cache.mkdir(parents=True, exist_ok=True)
    untie = gguf_arch(arch.family) in NEEDS_OUTPUT and is_tied(model_dir)
    with tempfile.TemporaryDirectory(prefix=".reference-", dir=cache) as tmp:
        source = model_dir
        if untie or zero_gate_names(model_dir) or converter_config_fixes(model_dir):
            source = write_reference_checkpoint(arch, model_dir, Path(tmp) / "checkpoint", untie_embeddings=untie).out
        partial = Path(tmp) / out.name
        run_tool("convert reference", [sys.executable, str(llama.converter), str(source), "--outtype", outtype,
                                       "--outfile", str(partial)], Path(tmp) / "convert.log", "eval",
                 env=llama.converter_env())
        os.replace(partial, out)
    return out


def _reference(reference: Path, llama: LlamaCpp, cache: Path) -> Path:
    if reference.is_dir():
        if not (reference / "config.json").is_file():
            raise EvalError(f"--reference {reference}: neither a GGUF file nor a model directory (no config.json)")
        return reference_gguf(reference, llama, cache)
    if not is_gguf(reference):
        raise EvalError(f"--reference {reference}: not a GGUF file (no GGUF magic) or a model directory")
    return reference


def _base_logits(ref: Path, text: str, window: int, windows: int | None, llama: LlamaCpp, cache: Path,
                 threads: int) -> Path:
    """The reference's saved log-probabilities (step 2), cached by reference, text, window and window count."""
    text_key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    key = _files_key([ref], {"text": text_key, "window": window, "windows": windows, "llama_cpp": PINNED_VERSION})
    base = cache / f"{ref.stem}-{key}.kld"
    if base.is_file():
        print(f"[eval] reference log-probabilities: {base} (cached)", flush=True)
        return base
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".logits-", dir=cache) as tmp:
        text_file, partial = Path(tmp) / "text.txt", Path(tmp) / base.name
        text_file.write_text(text, encoding="utf-8")
        cmd = [str(llama.tool("llama-perplexity")), "-m", str(ref), "-f", str(text_file), "-c", str(window),
               "-b", str(window), "-t", str(threads), "--kl-divergence-base", str(partial)]
        update, close = _chunk_bar(windows, r"\[(\d+)\]", "reference")
        try:
            out = run_tool("reference log-probabilities", cmd + (["--chunks", str(windows)] if windows else []),
                           Path(tmp) / "reference.log", "eval", progress=update)
        finally:
            close()
        if "you need at least" in out or not partial.is_file() or partial.stat().st_size == 0:
            tail = " | ".join(out.strip().splitlines()[-4:])
            raise EvalError(f"llama-perplexity wrote no log-probabilities (the split needs at least 2 windows of "
                            f"{window} tokens; try a smaller --window): {tail}")
        os.replace(partial, base)
    return base


def _bench(model: Path, llama: LlamaCpp, threads: int, log: Path) -> float:
    out = run_tool("llama-bench", [str(llama.tool("llama-bench")), "-m", str(model), "-p", "0", "-n",
                                   str(BENCH_TOKENS), "-r", str(BENCH_REPETITIONS), "-t", str(threads),
                                   "-o", "json"], log, "eval")
    return parse_bench_json(out)


def evaluate_gguf(model: str | Path, reference: str | Path | None, corpus: str = "english", split: str = "test",
                  max_tokens: int | None = None, window: int | None = None, llama_cpp: str | Path | None = None,
                  threads: int | None = None, bench: bool = True, cache: str | Path | None = None) -> GGUFEvalResult:
    """Score GGUF ``model`` against ``reference`` in llama.cpp (see the module docstring).

    Raises InputError (EvalError) for bad input, RuntimeError when a llama.cpp tool fails.
    """
    model = Path(model)
    if not is_gguf(model):
        raise EvalError(f"{model}: not a GGUF file (no GGUF magic)")
    if reference is None:
        raise EvalError("a GGUF is evaluated against the original: give --reference (its GGUF or its checkpoint "
                        "directory)")
    if window is None:
        trained = _context_length(model)
        window = min(DEFAULT_WINDOW, trained) if trained else DEFAULT_WINDOW
    if window < 4:
        raise EvalError(f"--window {window}: llama-perplexity needs at least 4 tokens per window")
    if max_tokens is not None and max_tokens < window:
        raise EvalError(f"--max-tokens {max_tokens} is below one window of {window} tokens")
    windows = None if max_tokens is None else max_tokens // window
    threads = threads or os.cpu_count() or 1
    text = read_text(corpus, split)
    tools = ("llama-perplexity",) + (("llama-bench",) if bench else ())
    reference = Path(reference)
    llama = resolve(llama_cpp, tools, converter=reference.is_dir())
    cache = Path(cache) if cache is not None else default_reference_cache()
    t0 = time.perf_counter()
    ref = _reference(reference, llama, cache)
    base = _base_logits(ref, text, window, windows, llama, cache, threads)
    with tempfile.TemporaryDirectory(prefix=".moecc-eval-") as tmp:
        update, close = _chunk_bar(windows, r"^\s*(\d+)\s+[-0-9.]", "model")
        try:
            out = run_tool("KL divergence", [str(llama.tool("llama-perplexity")), "-m", str(model), "-c", str(window),
                                             "-b", str(window), "-t", str(threads), "--kl-divergence-base",
                                             str(base), "--kl-divergence"], Path(tmp) / "kld.log", "eval",
                           progress=update)
        finally:
            close()
        values = parse_kld_output(out)
        speeds = ((_bench(model, llama, threads, Path(tmp) / "bench.log"),
                   _bench(ref, llama, threads, Path(tmp) / "bench-reference.log")) if bench else (None, None))
    n, w = int(values.pop("windows")), int(values.pop("window"))
    return GGUFEvalResult(model=str(model), reference=str(reference), corpus=corpus, split=split, window=w, windows=n,
                          tokens=n * (w - 1 - w // 2), threads=threads, decode_tokens_per_second=speeds[0],
                          reference_decode_tokens_per_second=speeds[1], seconds=round(time.perf_counter() - t0, 1),
                          **values)


def format_result(res: GGUFEvalResult) -> str:
    """The table ``runtime eval`` prints for a GGUF."""
    lines = [f"model        {res.model}",
             f"corpus       {res.corpus}/{res.split} ({res.windows} windows x {res.window} tokens, {res.tokens:,} "
             f"scored: {res.protocol})",
             f"engine       {res.engine}, {res.threads} threads",
             f"perplexity   {res.perplexity:.4f}",
             f"reference    {res.reference} (perplexity {res.reference_perplexity:.4f})",
             f"KL (nats)    mean {res.kl_mean:.6f}  median {res.kl_median:.6f}  p99 {res.kl_p99:.6f}  "
             f"p99.9 {res.kl_p999:.6f}  max {res.kl_max:.6f}",
             f"top-1 agree  {100 * res.top1_agreement:.3f}%"]
    if res.decode_tokens_per_second is not None and res.reference_decode_tokens_per_second is not None:
        lines.append(f"decode       {res.decode_tokens_per_second:,.1f} tokens/s (reference "
                     f"{res.reference_decode_tokens_per_second:,.1f}; llama-bench -n {BENCH_TOKENS})")
    return "\n".join(lines)


__all__ = ["GGUFEvalResult", "evaluate_gguf", "reference_gguf", "parse_kld_output", "parse_bench_json", "is_gguf",
           "format_result", "default_reference_cache", "KLD_FIELDS"]
