"""RTN versus the error-minimising (HQQ-style) and the calibrated GPTQ quantizers: test perplexity at 2, 3, 4 bits.

Every linear weight of the decoder (attention, dense MLPs, shared and routed experts) is fake-quantized
with ``runtime.quant`` (the runtime's own code, quantize then dequantize) in format ``int{b}_g{group}``; embeddings,
lm_head, norms and routers stay in full precision, as is usual for weight-only quantization. Nothing is
pruned and top-k is unchanged, so the rows isolate the quantizer. ``gptq`` calibrates on ``--calib-tokens``
tokens of ``--calib-data`` (default: the first 2048 tokens of the English calibration split, disjoint from the
test split) layer by layer as ``runtime apply`` does (:func:`runtime.calibration.gptq_sequential`;
``quantize_s`` includes those forward passes), or with ``--one-pass`` from the unquantized model
(:func:`runtime.calibration.collect_hessians`, once for all bit widths, time printed separately).

Reproduce (numbers in docs/runtime.md; ``--window`` defaults to the model's trained context, as in
``runtime eval``: 256 for R1, 512 for R3):

    python -m experiments.quant_methods --model models/r1-deepseek-v3-tiny --bits 2,3,4 --group 32 \
        --methods rtn,hqq,gptq --max-tokens 16384 --threads 1 --out experiments/results/quant_methods_r1.csv
    python -m experiments.quant_methods --model cache/r3 --bits 2,3,4 --group 16 --methods gptq \
        --max-tokens 16384 --threads 1 --append --out experiments/results/quant_methods_r3.csv

``--append`` keeps the CSV's other rows and replaces those with the same (model, method, bits, group).
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.entry import run_main
from experiments.results_io import write_rows
from optimizer.model_spec import BlockKind

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
    window: int | None = None  # the model's trained context (runtime.evaluate's default)
    calib_data: str = "english:calibration"
    calib_tokens: int = 2048
    percdamp: float = 0.01
    one_pass: bool = False  # gptq: Hessians of the unquantized model instead of layer by layer


def quantize_model_(model: torch.nn.Module, fmt: str, method: str, hessians=None, percdamp: float = 0.01,
                    calib_inputs: torch.Tensor | None = None) -> int:
    """Fake-quantize, in place, every 2-D/3-D decoder weight of the quantized kinds; returns how many tensors.

    Fused expert tensors ([E, 2I, H] and [E, H, I]) are quantized per expert along their last dimension,
    exactly as the per-expert blocks of a plan are. ``gptq``: with ``calib_inputs`` (token windows), layer by
    layer (:func:`runtime.calibration.gptq_sequential`, what ``runtime apply`` does); else with one Hessian
    per expert, ``[E, in, in]``, from ``hessians``, a :class:`runtime.calibration.Hessians` of the unquantized
    model (one pass).
    """
    from runtime.calibration import gptq_sequential
    from runtime.inmemory import model_architecture
    from runtime.quant import CALIBRATED_METHODS, quantize

    names = [n for n, p in model.named_parameters() if p.dim() >= 2 and _kind(n) in QUANTIZED_KINDS]
    if method in CALIBRATED_METHODS and calib_inputs is not None:
        formats = {b.name: fmt for b in model_architecture(model).blocks if b.kind in QUANTIZED_KINDS}
        gptq_sequential(model, calib_inputs, formats, percdamp)
        return len(names)
    count = 0
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2 or _kind(name) not in QUANTIZED_KINDS:
                continue
            hessian = None
            if method in CALIBRATED_METHODS:
                hessian = hessians.for_param(name) if hessians is not None else None
                if hessian is None:
                    raise RuntimeError(f"{name}: no calibration Hessian")
            qt = quantize(param.data.float(), fmt, method, hessian=hessian, percdamp=percdamp)
            param.copy_(qt.dequantize(param.dtype))
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


def calibrate(model: torch.nn.Module, cfg: Config):
    """Calibration windows and, for ``--one-pass``, the Hessians of every decoder linear input of the
    unquantized ``model`` (see ``runtime.calibration``)."""
    from runtime.calibration import calibration_inputs, collect_hessians

    t0 = time.perf_counter()
    inputs, calib = calibration_inputs(model, cfg.model, cfg.calib_data, cfg.calib_tokens, cfg.window)
    hessians = collect_hessians(model, inputs) if cfg.one_pass else None
    print(f"calibration: {calib.tokens} tokens of {calib.source} ({calib.windows} x {calib.window}), "
          + (f"{len(hessians.sums)} one-pass Hessians in {time.perf_counter() - t0:.1f} s" if hessians else
             "layer-by-layer Hessians (time included in quantize_s)"), flush=True)
    return inputs, hessians


def run(cfg: Config) -> list[dict]:
    from runtime.evaluate import evaluate, load_model
    from runtime.quant import CALIBRATED_METHODS

    base = load_model(cfg.model)
    rows = []
    inputs, hessians = calibrate(base, cfg) if any(m in CALIBRATED_METHODS for m in cfg.methods) else (None, None)

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
            n = quantize_model_(model, f"int{bits}_g{cfg.group}", method, hessians, cfg.percdamp,
                                None if cfg.one_pass else inputs)
            record(method, bits, model, time.perf_counter() - t0, n)
            del model
    return rows


def merge_rows(path: str | Path, rows: list[dict]) -> list[dict]:
    """The CSV's rows, each replaced in place by a new row of the same (model, method, bits, group); other new
    rows last."""
    key = ("model", "method", "bits", "group")
    new = {tuple(str(r[k]) for k in key): r for r in rows}
    old = []
    if Path(path).is_file():
        with open(path, newline="") as fh:
            old = list(csv.DictReader(fh))
    out, used = [], set()
    for r in old:
        k = tuple(r.get(c, "") for c in key)
        if k in new and r.get("method") == "none" and str(new[k]["perplexity"]) != r.get("perplexity"):
            print(f"warning: reference perplexity {new[k]['perplexity']} != {r.get('perplexity')} in {path}; "
                  "the settings differ from the existing rows'", flush=True)
        out.append(new.get(k, r))
        used.add(k)
    return out + [r for r in rows if tuple(str(r[c]) for c in key) not in used]


def main(argv: list[str] | None = None) -> int:
    from runtime.quant import METHODS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--methods", default="rtn,hqq", help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--corpus", default="english")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--window", type=int, default=None, help="default: min(512, max_position_embeddings)")
    ap.add_argument("--calib-data", default="english:calibration", help="gptq calibration text (CORPUS[:SPLIT])")
    ap.add_argument("--calib-tokens", type=int, default=2048, help="gptq calibration tokens")
    ap.add_argument("--percdamp", type=float, default=0.01, help="gptq damping, fraction of mean(diag H)")
    ap.add_argument("--one-pass", action="store_true", help="gptq: Hessians of the unquantized model, one pass")
    ap.add_argument("--out", default=None, help="CSV for the result rows")
    ap.add_argument("--append", action="store_true", help="update --out: replace rows with the same key, keep others")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    methods = tuple(a.methods.split(","))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"--methods: unknown {', '.join(bad)} (choose from {', '.join(METHODS)})")
    cfg = Config(model=a.model, bits=tuple(int(b) for b in a.bits.split(",")), methods=methods,
                 group=a.group, corpus=a.corpus, max_tokens=a.max_tokens, window=a.window,
                 calib_data=a.calib_data, calib_tokens=a.calib_tokens, percdamp=a.percdamp,
                 one_pass=a.one_pass)
    rows = run(cfg)
    if a.out:
        write_rows(a.out, merge_rows(a.out, rows) if a.append else rows)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
