"""Does a pruning plan survive the real llama.cpp? Export, convert, quantize, check types and bytes, perplexity.

``run`` (each step timed, one tidy CSV row per step or measurement):

1. ``runtime export PLAN --to llamacpp --model MODEL -o WORK/recipe``: the recipe and ``hf-pruned/``;
2. llama.cpp's ``convert_hf_to_gguf.py`` (the venv's python, the tree's own gguf-py) on the original
   checkpoint (untied into ``WORK/hf-original`` first when llama.cpp's arch has no tied output head, as for
   R3's qwen2moe) and on ``hf-pruned`` -> ``original-bf16.gguf``, ``pruned-bf16.gguf``;
3. ``llama-quantize --tensor-type-file tensor-types.txt pruned-bf16.gguf plan.gguf Q8_0``, as the README says;
4. checks with gguf-py's ``GGUFReader``: every tensor's type against ``tensor-types.txt`` (fallbacks named),
   ``{arch}.expert_count`` / ``expert_used_count``, planned bytes per GGUF tensor and in total against the
   GGUF's tensor bytes and file size;
5. perplexity on the first ``chunks x ctx`` tokens of the English test split (written to a text file):
   ``llama-perplexity -c ctx`` on the three GGUFs, and the same windows scored in PyTorch for the original
   model, ``hf-pruned`` and the plan applied by our runtime (``runtime.apply`` + ``runtime.load``; K-quants
   become int formats there). PyTorch rows give two protocols: ``runtime`` (every token, what
   ``python -m runtime eval --window ctx --max-tokens chunks*ctx`` prints) and ``llama`` (only the second
   half of each window, as llama-perplexity scores; the tokenizer adds no BOS, so the windows are the same).

``gguf-profile``: llama.cpp plans need GGUF formats in the profile; a profile measured with runtime int
formats (``python -m profiling run`` default) is given proxy GGUF columns: each GGUF type borrows the
sensitivity of the int format with the same bits (Q4_0/Q4_K <- int4_g*, Q8_0 <- int8_g*...), blanked where
the type does not admit a block's rows. A proxy, said so in the profile's measurement, not a measurement.

Reproduce (R3; numbers in docs/runtime.md ``## export``):

    python -m experiments.llamacpp_roundtrip gguf-profile experiments/profiles/r3/english.json \\
        -o /tmp/rt/profile-gguf.json
    python -m optimizer solve /tmp/rt/profile-gguf.json --target llamacpp --budget 95MB --context 0 \\
        --overhead 0 --reproducible -o /tmp/rt/plan.json
    python -m experiments.llamacpp_roundtrip run --model cache/r3 --plan /tmp/rt/plan.json \\
        --llama-cpp cache/llama.cpp --work /tmp/rt --out experiments/results/llamacpp_roundtrip_r3.csv
"""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from experiments.entry import run_main
from experiments.results_io import write_rows
from runtime.llamacpp import resolve
from runtime.prune_checkpoint import nudge_zero_gates  # moved to runtime (issue 16)

#: GGUF type -> bits of the runtime int format whose sensitivity it borrows in ``gguf-profile``
PROXY_BITS = {"Q2_K": 2, "Q3_K": 3, "Q4_0": 4, "Q4_K": 4, "Q5_0": 5, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}


@dataclass
class Config:
    model: Path
    plan: Path
    llama_cpp: Path | None  # None: runtime.llamacpp.resolve's default ($MOECC_LLAMA_CPP, cache/llama.cpp)
    work: Path
    out: Path | None = None
    ctx: int = 512
    chunks: int = 40
    threads: int = 1
    corpus: str = "english"


def gguf_profile(src: Path, out: Path) -> Path:
    """Write ``src`` with proxy GGUF columns (see the module docstring); returns ``out``."""
    from optimizer.formats import get_format
    from optimizer.profile import Sensitivity, load_profile, save_profile, with_costs

    p = load_profile(src)
    names, cols = [], []
    values = p.sensitivity.values
    for gguf_type, bits in PROXY_BITS.items():
        fmt = get_format(gguf_type)
        sources = [j for j, f in enumerate(p.sensitivity.formats) if get_format(f).bits == bits
                   and get_format(f).family == "int"]
        if not sources:
            continue
        col = np.full(len(p.architecture.blocks), np.nan)
        for b, block in enumerate(p.architecture.blocks):
            if block.quantizable and fmt.admits(block.shape):
                known = [values[b, j] for j in sources if not np.isnan(values[b, j])]
                if not known:
                    break
                col[b] = min(known)
        else:
            names.append(gguf_type)
            cols.append(col)
    for j, f in enumerate(p.sensitivity.formats):
        if get_format(f).family != "int":
            names.append(f)
            cols.append(values[:, j])
    meas = replace(p.sensitivity.measurement, method=p.sensitivity.measurement.method +
                   "; GGUF columns are PROXIES copied from the int format of the same bits (llamacpp_roundtrip)")
    sens = Sensitivity(tuple(names), np.stack(cols, axis=1), meas)
    save_profile(with_costs(p, formats=tuple(names), sensitivity=sens), out)
    print(f"wrote {out} ({', '.join(names)})")
    return out


def _timed(cmd: list[str], log: Path, env: dict | None = None) -> tuple[float, str]:
    """Run ``cmd`` (nice'd), its output to ``log``; (seconds, output). Raises on failure."""
    t0 = time.perf_counter()
    res = subprocess.run(["nice", "-n", "5", *cmd], capture_output=True, text=True, env=env)
    log.write_text(res.stdout + res.stderr)
    if res.returncode:
        raise RuntimeError(f"{cmd[0]} failed ({res.returncode}); see {log}:\n{(res.stdout + res.stderr)[-2000:]}")
    return time.perf_counter() - t0, res.stdout + res.stderr


def _convert(cfg: Config, src: Path, dst: Path) -> float:
    llama = resolve(cfg.llama_cpp, converter=True)
    seconds, _ = _timed([sys.executable, str(llama.converter), str(src), "--outtype", "bf16",
                         "--outfile", str(dst)], dst.with_suffix(".log"), llama.converter_env())
    return seconds


def check_gguf(cfg: Config, gguf_path: Path, recipe: Path, plan, arch) -> dict:
    """Types, expert keys and bytes of the quantized GGUF against the recipe and the plan."""
    import gguf  # the venv's gguf-py (same 0.19.0 release as the tree's; reading needs no newer types)

    from optimizer.byte_model import block_bytes
    from runtime.export import GGUF_ARCH, gguf_name, parse_tensor_types

    r = gguf.GGUFReader(str(gguf_path))
    want = parse_tensor_types((recipe / "tensor-types.txt").read_text())
    got = {t.name: t.tensor_type.name for t in r.tensors}
    nbytes = {t.name: int(t.n_bytes) for t in r.tensors}
    mismatched = {n: (ty, got.get(n)) for n, ty in want.items() if n in got and got[n] != ty}
    absent = sorted(n for n in want if n not in got)
    prefix = GGUF_ARCH[arch.family]
    field = lambda key: int(r.fields[key].contents()) if key in r.fields else None  # noqa: E731
    planned: dict[str, int] = {}
    for block in arch.blocks:
        fmt = plan.formats.get(block.name)
        target = gguf_name(block.name, arch.family, arch.num_layers)
        if fmt is None or target is None:
            continue
        planned[target] = planned.get(target, 0) + block_bytes(block, fmt)
    byte_diff = {n: (planned[n], nbytes[n]) for n in want if n in nbytes and n in planned and planned[n] != nbytes[n]}
    unplanned = {n: nbytes[n] for n in want if n in nbytes and n not in planned}  # output.weight of an untied head
    k = {lp.top_k for lp in plan.layers}.pop()
    n = {len(lp.kept_experts) for lp in plan.layers}.pop()
    return {
        "tensors": len(got), "typed_tensors": len(want), "type_mismatches": len(mismatched),
        "mismatch_examples": "; ".join(f"{n}: {a}->{b}" for n, (a, b) in list(mismatched.items())[:4]),
        "absent_from_gguf": ";".join(absent[:6]),
        "expert_count": field(f"{prefix}.expert_count"), "expert_used_count": field(f"{prefix}.expert_used_count"),
        "expected_experts": n, "expected_k": k,
        "typed_tensor_bytes_gguf": sum(nbytes[n] for n in want if n in nbytes),
        "typed_tensor_bytes_planned": sum(planned.get(n, 0) for n in want if n in nbytes),
        "typed_byte_mismatches": len(byte_diff),
        "unplanned_tensors": ";".join(f"{n}={b}" for n, b in unplanned.items()),
        "gguf_tensor_bytes": sum(nbytes.values()), "gguf_file_bytes": gguf_path.stat().st_size,
        "planned_bytes": plan.bytes.total,
    }


def _llama_ppl(cfg: Config, gguf_path: Path, text: Path) -> dict:
    seconds, out = _timed([str(resolve(cfg.llama_cpp).tool("llama-perplexity")), "-m", str(gguf_path),
                           "-f", str(text), "-c", str(cfg.ctx), "-b", str(cfg.ctx), "-t", str(cfg.threads),
                           "--chunks", str(cfg.chunks)], gguf_path.with_suffix(".ppl.log"))
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    running = re.findall(r"\[(\d+)\]([-+\w.]+),", out)  # running PPL after each chunk; the last is the final
    chunks = re.search(r"perplexity over (\d+) chunks", out)
    return {"perplexity": float(running[-1][1]) if running else None, "ppl_stderr": float(m.group(2)) if m else None,
            "chunks": int(chunks.group(1)) if chunks else None, "seconds": round(seconds, 1)}


def _score(model, ids: list[int], ctx: int, chunks: int) -> tuple[float, float]:
    """(perplexity over every token, over the second half of each window) of ``chunks`` windows of ``ctx``."""
    import torch

    data = torch.tensor(ids[: chunks * ctx + 1], dtype=torch.long)
    first, nll_all, nll_half = ctx // 2, 0.0, 0.0
    with torch.no_grad():
        for i in range(chunks):
            x = data[i * ctx:(i + 1) * ctx][None]
            y = data[i * ctx + 1:(i + 1) * ctx + 1]
            logp = model(input_ids=x).logits[0].float().log_softmax(-1)
            tok = -logp.gather(1, y[:, None])[:, 0].double()
            nll_all += float(tok.sum())
            nll_half += float(tok[first:ctx - 1].sum())
    return math.exp(nll_all / (chunks * ctx)), math.exp(nll_half / (chunks * (ctx - first - 1)))


def _eval_text(cfg: Config, path: Path) -> list[int]:
    """Write the first ``chunks * ctx`` (+ margin) tokens of the test split as text; its token ids."""
    from transformers import AutoTokenizer

    from runtime.corpora import load_corpus

    tok = AutoTokenizer.from_pretrained(cfg.model)
    text = load_corpus(cfg.corpus, "test")
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    need = cfg.chunks * cfg.ctx + 32
    if len(enc["input_ids"]) < need:
        raise SystemExit(f"the test split has {len(enc['input_ids'])} tokens, fewer than {need}")
    path.write_text(text[: enc["offset_mapping"][need][0]], encoding="utf-8")
    return tok(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]


def run(cfg: Config) -> list[dict]:
    """All steps; returns the rows (also written to ``cfg.out``)."""
    import torch

    from optimizer.architectures import load_architecture
    from optimizer.plan import LayerPlan, load_plan
    from runtime.apply import apply_plan
    from runtime.checkpoint import load_pretrained
    from runtime.export import export, untie_needed
    from runtime.load import load
    from runtime.prune_checkpoint import is_tied, write_pruned_checkpoint

    torch.set_num_threads(cfg.threads)
    work, recipe = cfg.work, cfg.work / "recipe"
    work.mkdir(parents=True, exist_ok=True)
    plan, arch = load_plan(cfg.plan), load_architecture(cfg.model)
    rows: list[dict] = []

    def add(**row) -> None:
        rows.append(row)
        print(row, flush=True)

    model, nudged = nudge_zero_gates(cfg.model, work / "model-nudged")
    if nudged:
        add(step="nudge_zero_gates", note=f"{nudged} all-zero shared_expert_gate rows set to 1e-20 (llama.cpp "
            "qwen2moe computes sigmoid as silu(x)/x: 0/0 = NaN)")
    cfg = replace(cfg, model=model)
    t0 = time.perf_counter()
    export(cfg.plan, "llamacpp", recipe, cfg.model, overwrite=True)
    add(step="export", seconds=round(time.perf_counter() - t0, 1),
        note=f"{len(plan.layers[0].kept_experts)} experts, k={plan.layers[0].top_k}")
    ggufs = {"original": work / "original-bf16.gguf", "pruned": work / "pruned-bf16.gguf", "plan": work / "plan.gguf"}
    original = cfg.model
    if untie_needed(plan, arch.family) and is_tied(cfg.model):  # llama.cpp's qwen2moe/olmoe need output.weight
        full = replace(plan, layers=tuple(LayerPlan(m.index, tuple(range(m.num_experts)), m.top_k)
                                          for m in arch.moe_layers))  # every expert, original k
        original = write_pruned_checkpoint(full, arch, cfg.model, work / "hf-original", untie_embeddings=True,
                                           overwrite=True).out
    for variant, src in (("original", original), ("pruned", recipe / "hf-pruned")):
        add(step="convert", variant=variant, seconds=round(_convert(cfg, src, ggufs[variant]), 1),
            gguf_file_bytes=ggufs[variant].stat().st_size)
    seconds, _ = _timed([str(resolve(cfg.llama_cpp).tool("llama-quantize")), "--tensor-type-file",
                         str(recipe / "tensor-types.txt"), str(ggufs["pruned"]), str(ggufs["plan"]), "Q8_0",
                         str(cfg.threads)], work / "quantize.log")
    add(step="quantize", variant="plan", seconds=round(seconds, 1), gguf_file_bytes=ggufs["plan"].stat().st_size)
    add(step="check", variant="plan", **check_gguf(cfg, ggufs["plan"], recipe, plan, arch))

    ids = _eval_text(cfg, work / "test.txt")
    for variant, path in ggufs.items():
        add(step="perplexity", variant=variant, engine="llama.cpp", protocol="llama",
            **_llama_ppl(cfg, path, work / "test.txt"))
    t0 = time.perf_counter()
    apply_plan(cfg.plan, cfg.model, work / "applied", overwrite=True)
    add(step="runtime_apply", variant="plan", seconds=round(time.perf_counter() - t0, 1))
    loaders = {"original": lambda: load_pretrained(cfg.model),
               "pruned": lambda: load_pretrained(recipe / "hf-pruned"),
               "plan": lambda: load(work / "applied")}
    for variant, make in loaders.items():
        t0 = time.perf_counter()
        model = make().eval()
        if variant == "original":  # the "runtime" protocol is `python -m runtime eval`'s: check on 2 windows
            from runtime.evaluate import evaluate

            ref = evaluate(model, corpus=str(work / "test.txt"), max_tokens=2 * cfg.ctx, window=cfg.ctx).perplexity
            add(step="check_protocol", note="runtime.evaluate vs this script, 2 windows",
                perplexity=round(ref, 4), value=round(_score(model, ids, cfg.ctx, 2)[0], 4))
        every, half = _score(model, ids, cfg.ctx, cfg.chunks)
        seconds = round(time.perf_counter() - t0, 1)
        engine = "runtime" if variant == "plan" else "transformers"
        add(step="perplexity", variant=variant, engine=engine, protocol="llama", perplexity=round(half, 4),
            chunks=cfg.chunks, seconds=seconds)
        add(step="perplexity", variant=variant, engine=engine, protocol="runtime", perplexity=round(every, 4),
            chunks=cfg.chunks, seconds=seconds)
    if cfg.out:
        write_rows(cfg.out, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("gguf-profile", help="add proxy GGUF columns to an int-format profile")
    g.add_argument("profile", type=Path)
    g.add_argument("-o", "--out", type=Path, required=True)
    r = sub.add_parser("run", help="export, convert, quantize, check, perplexity")
    r.add_argument("--model", type=Path, required=True)
    r.add_argument("--plan", type=Path, required=True)
    r.add_argument("--llama-cpp", type=Path, default=None,
                   help="llama.cpp tree (default: $MOECC_LLAMA_CPP, else cache/llama.cpp; `python -m runtime llama-cpp "
                        "build` makes it)")
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--out", type=Path, default=None)
    r.add_argument("--ctx", type=int, default=512)
    r.add_argument("--chunks", type=int, default=40)
    r.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.command == "gguf-profile":
        gguf_profile(a.profile, a.out)
        return 0
    run(Config(a.model, a.plan, a.llama_cpp, a.work, a.out, a.ctx, a.chunks, a.threads))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
