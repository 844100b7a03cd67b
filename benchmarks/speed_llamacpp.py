"""The decode-speed model against llama.cpp: predicted vs measured tokens/s of plans that differ in k and formats.

Reproduce (the table in ``benchmarks/results/speed_llamacpp.md``; about 15 minutes on 2 cores; needs the R3
reference model in ``cache/r3`` and llama.cpp built by ``python -m runtime llama-cpp build``)::

    python benchmarks/speed_llamacpp.py --work build/speed --resume -o benchmarks/results/speed_llamacpp.json

Plans of R3 (``--target llamacpp``, ``experiments/profiles/r3/english-gguf.json``, no context or overhead
reserve; :data:`PLANS`): one GGUF type everywhere (Q4_0, Q5_0, Q8_0; ``--solver uniform``) at R3's own k = 12
and with k lowered in every layer (12 -> 6, 4, 2), and the tied ILP at two budgets. Each is exported to GGUF
(``runtime export --to gguf``) and timed by ``llama-bench -p 0 -n 64 -r 5 -t THREADS`` (mean decode tokens/s).

Per plan, bytes read per decoded token by format (``optimizer.formulation``'s speed row: every non-expert
block, one embedding row, and per MoE layer k times an expert's bytes; no KV cache at an empty context), and
two predictions:

    bandwidth model (the profile's device):   t = sum_f read_f / bandwidth
    fitted model (this script's fit):         t = overhead + sum_f read_f / throughput_f

The fitted model's ``overhead`` (seconds per token no read explains: graph, threads, attention at tiny
context) and per-format ``throughput_f`` are least squares (non-negative) on the one-type plans; the ILP plans
are held out. Reported: predicted / measured per plan, and the Spearman rank correlation of each model.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimizer.byte_model import block_bytes  # noqa: E402
from optimizer.model_spec import BlockKind  # noqa: E402
from optimizer.plan import load_plan  # noqa: E402
from optimizer.profile import load_profile  # noqa: E402

MODEL = ROOT / "cache" / "r3"
PROFILE = ROOT / "experiments" / "profiles" / "r3" / "english-gguf.json"
#: name: (GGUF type of the one-type plan or None for the ILP, top-k or None for R3's own 12, budget, held out)
PLANS: dict[str, tuple[str | None, int | None, str, bool]] = {
    **{f"{f}-k12": (f, None, "1TB", False) for f in ("Q4_0", "Q5_0", "Q8_0")},
    **{f"{f}-k{k}": (f, k, "1TB", False) for f in ("Q4_0", "Q8_0") for k in (6, 2)},
    "Q5_0-k4": ("Q5_0", 4, "1TB", True),
    "ilp-108MB": (None, None, "108MB", True),
    "ilp-140MB": (None, None, "140MB", True),
}


def make_plan(name: str, out: Path) -> None:
    """The plan ``name`` of :data:`PLANS`: ``--solver uniform`` with one GGUF type (rows it cannot store take
    the next larger type, as ``llama-quantize`` does), k lowered in every layer where asked; or the tied ILP."""
    from dataclasses import replace

    from optimizer.baselines import BaselineOptions
    from optimizer.budget import make_budget
    from optimizer.formulation.instance import FormulationOptions
    from optimizer.plan import Target, save_plan
    from optimizer.solve import SolveOptions, optimize

    fmt, k, budget, _ = PLANS[name]
    profile = load_profile(PROFILE)
    b = make_budget(profile.architecture, budget, context=0, overhead=0)
    fo = FormulationOptions(target=Target.LLAMACPP)
    so = SolveOptions(solver="uniform" if fmt else "highs", reproducible=True, time_limit=60,
                      baseline=BaselineOptions(uniform_format=fmt))
    plan = optimize(profile, b, fo, so)
    if k is not None:
        plan = replace(plan, layers=tuple(replace(lp, top_k=k) for lp in plan.layers))
    save_plan(plan, out)


def read_by_format(plan_path: Path, profile) -> dict[str, float]:
    """Bytes read per decoded token by the plan, by format: non-expert blocks whole (an embedding one row),
    routed experts k times per layer (a llamacpp plan gives a layer's experts one format per projection)."""
    plan = load_plan(plan_path)
    arch = profile.architecture
    layers = {lp.layer: lp for lp in plan.layers}
    out: dict[str, float] = {}
    for block in arch.blocks:
        fmt = plan.formats.get(block.name)
        if fmt is None:
            continue
        nbytes = float(block_bytes(block, fmt))
        if block.kind == BlockKind.EMBEDDING and not arch.tied_head:  # tied: the head too, read whole
            nbytes /= block.shape[0]
        if block.is_routed_expert:
            lp = layers[block.layer]
            if block.expert not in lp.kept_experts:
                continue
            nbytes *= lp.top_k / len(lp.kept_experts)  # k experts of the kept ones, all alike in bytes
        out[fmt] = out.get(fmt, 0.0) + nbytes
    return out


def measure(name: str, work: Path, threads: int) -> dict:
    """Plan, export, bench one plan."""
    from runtime.gguf_eval import parse_bench_json
    from runtime.llamacpp import resolve

    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    make_plan(name, d / "plan.json")
    gguf = d / "model.gguf"
    if not gguf.exists():
        subprocess.run([sys.executable, "-m", "runtime", "export", str(d / "plan.json"), "--model", str(MODEL),
                        "--to", "gguf", "-o", str(gguf)], check=True, cwd=ROOT, capture_output=True)
    bench = resolve(None, ("llama-bench",)).tool("llama-bench")
    out = subprocess.run([str(bench), "-m", str(gguf), "-p", "0", "-n", "64", "-r", "5", "-t", str(threads),
                          "-o", "json"], check=True, capture_output=True, text=True).stdout
    plan = load_plan(d / "plan.json")
    return {"plan": name, "top_k": sorted({lp.top_k for lp in plan.layers}),
            "experts": sorted({len(lp.kept_experts) for lp in plan.layers}),
            "formats": sorted(set(plan.formats.values())), "gguf_bytes": gguf.stat().st_size,
            "measured_tokens_per_s": parse_bench_json(out)}


def fit(rows: list[dict]) -> tuple[float, dict[str, float]]:
    """Non-negative least squares of t = overhead + sum_f read_f / tp_f on the rows not held out."""
    from scipy.optimize import nnls

    train = [r for r in rows if not r["held_out"]]
    fmts = sorted({f for r in rows for f in r["read_by_format"]})
    a = np.array([[1.0] + [r["read_by_format"].get(f, 0.0) / 1e9 for f in fmts] for r in train])
    t = np.array([1.0 / r["measured_tokens_per_s"] for r in train])
    x, _ = nnls(a, t)
    return float(x[0]), {f: (1e9 / v if v > 0 else float("inf")) for f, v in zip(fmts, x[1:])}


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def fitted_device(doc: dict):
    """The fitted model as a :class:`~optimizer.profile.Device` (``--device FILE``): the profile's bandwidth,
    the fitted throughputs below it (a format priced at 1 / min(bandwidth, throughput) per byte) and the
    fitted per-token overhead; a format not in the fit is priced at the bandwidth."""
    from optimizer.profile import Device, Measurement

    profile = load_profile(PROFILE)
    overhead, tp = fit(doc["rows"])
    return Device(profile.device.memory_bandwidth_bytes_per_s, Measurement(
        method=f"fitted to llama-bench decode speeds of {sum(not r['held_out'] for r in doc['rows'])} R3 GGUFs "
               f"(benchmarks/speed_llamacpp.py, -t {doc['settings']['threads']}): t = overhead + sum_f read_f / "
               "min(bandwidth, throughput_f)"),
        {f: v for f, v in tp.items() if np.isfinite(v)}, overhead)


def analyse(doc: dict) -> dict:
    profile = load_profile(PROFILE)
    bw = profile.device.memory_bandwidth_bytes_per_s
    rows = doc["rows"]
    overhead, tp = fit(rows)
    device = fitted_device(doc)
    for r in rows:
        read = r["read_by_format"]
        r["bandwidth_tokens_per_s"] = bw / sum(read.values())
        eq = sum(v * max(1.0, bw / device.format_throughput[f]) if f in device.format_throughput else v
                 for f, v in read.items())
        r["fitted_tokens_per_s"] = device.tokens_per_s(eq)
    meas = [r["measured_tokens_per_s"] for r in rows]
    return {"overhead_s": overhead, "throughput": tp, "bandwidth": bw,
            "spearman_bandwidth": spearman([r["bandwidth_tokens_per_s"] for r in rows], meas),
            "spearman_fitted": spearman([r["fitted_tokens_per_s"] for r in rows], meas)}


def report(doc: dict) -> str:
    a = analyse(doc)
    s = doc["settings"]
    lines = ["# Decode speed: predicted vs llama.cpp", "",
             f"Generated by `python benchmarks/speed_llamacpp.py` (its docstring has the command and the plans): R3, "
             f"llama-bench -n 64 -r 5 -t {s['threads']}, {s['machine']}.", "",
             "| plan | k | experts | formats | GGUF MB | measured tok/s | bandwidth model | ratio | fitted model "
             "| ratio | in fit |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in doc["rows"]:
        m = r["measured_tokens_per_s"]
        lines.append(f"| {r['plan']} | {','.join(map(str, r['top_k']))} | {','.join(map(str, r['experts']))} | "
                     f"{' '.join(r['formats'])} | {r['gguf_bytes'] / 1e6:.1f} | {m:.1f} | "
                     f"{r['bandwidth_tokens_per_s']:.1f} | {r['bandwidth_tokens_per_s'] / m:.2f} | "
                     f"{r['fitted_tokens_per_s']:.1f} | {r['fitted_tokens_per_s'] / m:.2f} | "
                     f"{'no (held out)' if r['held_out'] else 'yes'} |")
    tps = ", ".join(f"{f} {v / 1e9:.2f} GB/s" for f, v in a["throughput"].items() if np.isfinite(v))
    free = ", ".join(f for f, v in a["throughput"].items() if not np.isfinite(v))
    lines += ["", f"Bandwidth model: the profile's {a['bandwidth'] / 1e9:.1f} GB/s; Spearman rank correlation with the "
              f"measured speeds {a['spearman_bandwidth']:.2f}.",
              f"Fitted model: overhead {a['overhead_s'] * 1e3:.2f} ms per token; throughput {tps} (no cost fitted, "
              f"so priced at the bandwidth: {free}); Spearman {a['spearman_fitted']:.2f}. Written as "
              "`speed_llamacpp.device.json` for `optimizer solve --device FILE`."]
    inverted = [(a["plan"], b["plan"]) for a in doc["rows"] for b in doc["rows"]
                if a["formats"] == b["formats"] and a["top_k"] < b["top_k"]
                and a["measured_tokens_per_s"] < b["measured_tokens_per_s"]]
    if inverted:
        pairs = "; ".join(f"{a} slower than {b}" for a, b in inverted)
        lines += ["", f"Fewer experts per token decoded slower here ({pairs}): at this size llama.cpp's decode time "
                  "is not a linear function of the bytes read, which both models assume."]
    lines += ["", "The ILP plans are HiGHS's best within 60 s, so a rerun on a busier or faster machine can solve "
              "to another plan."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import os
    import platform

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=ROOT / "build" / "speed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "speed_llamacpp.json")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown from OUTPUT")
    args = p.parse_args(argv)
    doc = json.loads(args.output.read_text()) if args.output.is_file() and (args.resume or args.report) else {}
    if not args.report:
        doc["settings"] = {"threads": args.threads,
                           "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
        done = {r["plan"] for r in doc.get("rows", [])}
        profile = load_profile(PROFILE)
        for name, (_, _, _, held_out) in PLANS.items():
            if name in done:
                continue
            print(f"{name} ...", flush=True)
            row = measure(name, args.work, args.threads)
            row["read_by_format"] = read_by_format(args.work / name / "plan.json", profile)
            row["held_out"] = held_out
            doc.setdefault("rows", []).append(row)
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(doc, indent=1) + "\n")
            print(f"  {row['measured_tokens_per_s']:.1f} tokens/s", flush=True)
    md = args.output.with_suffix(".md")
    md.write_text(report(doc))
    from optimizer.profile import device_to_json

    dev = args.output.with_suffix(".device.json")
    dev.write_text(json.dumps(device_to_json(fitted_device(doc)), indent=1) + "\n")
    print(f"wrote {md} and {dev} (python -m optimizer solve ... --device {dev})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
