"""RTN versus the error-minimising (HQQ-style) quantizer: test perplexity at 2, 3 and 4 bits.

Every linear weight of the decoder (attention, dense MLPs, shared and routed experts) is fake-quantized
with ``runtime.quant.fake_quantize`` (the runtime's own code) in format ``int{b}_g{group}``; embeddings,
lm_head, norms and routers stay in full precision, as is usual for weight-only quantization. Nothing is
pruned and top-k is unchanged, so the rows isolate the quantizer.

Reproduce (numbers in the README and in the issue notes):

    python -m experiments.quant_methods --model models/r1-deepseek-v3-tiny --bits 2,3,4 --group 32 \
        --max-tokens 32768 --out experiments/results/quant_methods_r1.csv
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.results_io import write_rows
from optimizer.architecture import BlockKind

QUANTIZED_KINDS = {BlockKind.ATTENTION, BlockKind.DENSE_MLP, BlockKind.SHARED_EXPERT, BlockKind.ROUTED_EXPERT}


@dataclass(frozen=True)
class Config:
    model: str
    bits: tuple[int, ...] = (2, 3, 4)
    methods: tuple[str, ...] = ("rtn", "hqq")
    group: int = 32
    corpus: str = "english"
    split: str = "test"
    max_tokens: int = 32768
    window: int = 512


def quantize_model_(model: torch.nn.Module, fmt: str, method: str) -> int:
    """Fake-quantize, in place, every 2-D/3-D decoder weight of the quantized kinds; returns how many tensors.

    Fused expert tensors ([E, 2I, H] and [E, H, I]) are quantized per expert along their last dimension,
    exactly as the per-expert blocks of a plan are.
    """
    from runtime.quant import fake_quantize

    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2 or _kind(name) not in QUANTIZED_KINDS:
                continue
            param.copy_(fake_quantize(param.data.float(), fmt, method=method).to(param.dtype))
            count += 1
    return count


def _kind(name: str) -> BlockKind | None:
    if "embed_tokens" in name or name.startswith("lm_head"):
        return None
    if ".mlp.gate." in name or name.endswith("mlp.gate.weight") or "block_sparse_moe.gate" in name \
            or "shared_expert_gate" in name or "norm" in name:
        return None
    if ".experts." in name:
        return BlockKind.ROUTED_EXPERT
    if "shared_expert" in name:
        return BlockKind.SHARED_EXPERT
    if "self_attn" in name:
        return BlockKind.ATTENTION
    if ".mlp." in name:
        return BlockKind.DENSE_MLP
    return None


def run(cfg: Config) -> list[dict]:
    from runtime.evaluate import evaluate, load_model

    base = load_model(cfg.model)
    rows = []

    def record(method: str, bits: int | None, model, seconds: float, tensors: int) -> None:
        res = evaluate(model, corpus=cfg.corpus, split=cfg.split, max_tokens=cfg.max_tokens, window=cfg.window)
        row = {"model": Path(cfg.model).name, "method": method, "bits": bits or 16, "group": cfg.group,
               "format": "bf16/f32 (reference)" if bits is None else f"int{bits}_g{cfg.group}",
               "tensors": tensors, "quantize_s": round(seconds, 2), "tokens": res.tokens,
               "perplexity": round(res.perplexity, 4), "bits_per_byte": round(res.bits_per_byte, 4)}
        rows.append(row)
        print(", ".join(f"{k}={v}" for k, v in row.items()), flush=True)

    # the reference is evaluated on the model as loaded (its own precision)
    record("none", None, base, 0.0, 0)
    for bits in cfg.bits:
        for method in cfg.methods:
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            n = quantize_model_(model, f"int{bits}_g{cfg.group}", method)
            record(method, bits, model, time.perf_counter() - t0, n)
            del model
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--methods", default="rtn,hqq")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--corpus", default="english")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--out", default=None, help="CSV for the result rows")
    a = ap.parse_args(argv)
    cfg = Config(model=a.model, bits=tuple(int(b) for b in a.bits.split(",")), methods=tuple(a.methods.split(",")),
                 group=a.group, corpus=a.corpus, max_tokens=a.max_tokens, window=a.window)
    rows = run(cfg)
    if a.out:
        write_rows(a.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
