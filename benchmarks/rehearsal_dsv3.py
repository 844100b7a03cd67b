"""DeepSeek-V3-size rehearsal: profile (``--streamed``) and apply a random-init model with V3's real layer shapes.

Reproduce (the table in ``benchmarks/results/rehearsal_dsv3.md``; about 40 minutes on 2 cores, 12 GB of disk
at 32 experts, each model deleted after its steps unless ``--keep``)::

    python benchmarks/rehearsal_dsv3.py --experts 24 32 --work build/rehearsal --resume \\
        -o benchmarks/results/rehearsal_dsv3.json
    python benchmarks/rehearsal_dsv3.py --report benchmarks/results/rehearsal_dsv3.json   # rewrite the table only

**Model.** DeepSeek-V3's own config (``optimizer/data/deepseek_v3/config_671B.json``: hidden 7168, MLA with
q-LoRA 1536 and kv-LoRA 512, 128 heads, expert width 2048, one shared expert, top-8 over 8 groups of which 4
are routed to, vocabulary 129,280), cut to one dense layer and ``--moe-layers`` MoE layers of E routed
experts, weights drawn N(0, 0.02) and stored in bfloat16 (as the released checkpoint's bf16 conversion is);
byte-level tokenizer. Everything of a layer has V3's real size except the expert count.

**Steps per E**, each a child process whose peak resident memory is its own (``os.wait4``):
``build`` (writes one safetensors shard per layer, a layer at a time); ``profile`` =
``python -m profiling run --streamed --measure none --formats int4_g128 BF16`` over ``--tokens`` calibration
tokens: the reference pass with routing statistics and the proxy (every block quantized once per quantized
candidate), no measured perturbation and no device test; ``solve`` at 30% of the bf16 weight bytes (with no
measured prune cost, ``--expert-weight 1`` prices the proxy); ``apply``
(RTN). The profile's details file gives the reference pass's seconds per decoder layer (load, forward,
statistics, unload) and for the head. A measured perturbation starting at layer l costs the forward (and,
streamed, the load) of layers l..60 and the head again, which these timings price.

**Extrapolation to the 61-layer, 256-expert model** (3 dense + 58 MoE layers), from the largest E measured,
with P(E) the weights of a MoE layer at E experts:

    per MoE layer, reference pass    t(256) = forward + (load + statistics + unload) x P(256) / P(E)
    streamed profile, peak RSS       M(256) = M(E) + 4 bytes x (P(256) - P(E))   (one layer resident, float32)
    reference pass, full model       T = t_outer + 3 t_dense + 58 t(256)     (t_outer: load + head, measured)
    apply, full model                bf16 bytes of the full model / measured apply throughput (bytes/s)

A smaller E, when measured, checks the model: it is predicted from the largest and compared.

Measured perturbations are not extrapolated as a total: each costs a forward of the layers after it plus the
head, so their count, chosen by the user, decides. A GPU is not measured here: profiling and apply run on
the CPU only.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from optimizer.architectures.deepseek import reference_to_hf  # noqa: E402
from optimizer.errors import MoeccError  # noqa: E402

CONFIG = ROOT / "optimizer" / "data" / "deepseek_v3" / "config_671B.json"
FULL_EXPERTS, FULL_MOE_LAYERS, FULL_DENSE_LAYERS = 256, 58, 3
STEPS = ("build", "profile", "solve", "apply")
#: the profile's candidates: one quantized format (the statistics pass quantizes every block once per quantized
#: candidate, so its time is per candidate: the default six take six times as long)
FORMATS = ("int4_g128", "BF16")
INIT_STD = 0.02


def rehearsal_config(experts: int, moe_layers: int) -> dict:
    """transformers config dict: DeepSeek-V3's dimensions, one dense layer, ``moe_layers`` MoE layers."""
    from runtime.byte_tokenizer import BOS_ID, PAD_ID

    if experts < 24 or experts % 8:
        raise ValueError(f"--experts {experts}: V3 routes top-8 over 4 of 8 groups, so E must be a multiple of 8 "
                         "and >= 24 (at 16, groups of 2: a group left with one expert can leave only 7 routable)")
    cfg = reference_to_hf(json.loads(CONFIG.read_text()), str(CONFIG))
    cfg.update(num_hidden_layers=1 + moe_layers, first_k_dense_replace=1, n_routed_experts=experts,
               bos_token_id=BOS_ID, eos_token_id=BOS_ID, pad_token_id=PAD_ID, initializer_range=INIT_STD,
               max_position_embeddings=4096, use_cache=False, architectures=["DeepseekV3ForCausalLM"],
               dtype="bfloat16")
    return cfg


def checkpoint_shapes(cfg: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """Tensor names and shapes per shard ("outer", "layer.N"), with experts stored one module each (the
    on-disk layout of DeepSeek's checkpoints), from transformers' own model on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shards: dict[str, dict[str, tuple[int, ...]]] = {}
    inter, hidden = cfg["moe_intermediate_size"], cfg["hidden_size"]
    for name, t in model.state_dict().items():
        shard = f"layer.{name.split('.')[2]}" if name.startswith("model.layers.") else "outer"
        if ".mlp.experts." in name:  # fused in memory: gate_up_proj [E, 2I, H] / down_proj [E, H, I]
            if name.endswith("gate_up_proj"):
                prefix = name[: -len("gate_up_proj")]
                for e in range(t.shape[0]):
                    shards.setdefault(shard, {})[f"{prefix}{e}.gate_proj.weight"] = (inter, hidden)
                    shards[shard][f"{prefix}{e}.up_proj.weight"] = (inter, hidden)
                    shards[shard][f"{prefix}{e}.down_proj.weight"] = (hidden, inter)
            continue
        shards.setdefault(shard, {})[name] = tuple(t.shape)
    return shards


def build(out: Path, experts: int, moe_layers: int, seed: int) -> dict:
    """Write the random bf16 checkpoint, one shard per layer (so no more than a layer is ever in memory)."""
    import torch
    from safetensors.torch import save_file

    from runtime.byte_tokenizer import save_byte_tokenizer

    cfg = rehearsal_config(experts, moe_layers)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for shard, tensors in checkpoint_shapes(cfg).items():
        fname = f"model-{shard.replace('.', '-')}.safetensors"
        data = {}
        for name, shape in tensors.items():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            elif name.endswith("e_score_correction_bias"):
                t = torch.zeros(shape, dtype=torch.float32)
            else:
                t = (torch.randn(shape, generator=gen) * INIT_STD).to(torch.bfloat16)
            data[name] = t
            total += t.numel() * t.element_size()
            weight_map[name] = fname
        save_file(data, str(out / fname), metadata={"format": "pt"})
        del data
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps({**cfg, "transformers_version": _version("transformers")}, indent=1))
    save_byte_tokenizer(out)
    return {"checkpoint_bytes": total}


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def run_child(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its wall time and its own peak RSS (``os.wait4``, not the max over all children)."""
    t = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {rc}:\n" + "\n".join(tail))
    return {"seconds": time.perf_counter() - t, "peak_rss_bytes": usage.ru_maxrss * 1024}


def run_steps(experts: int, args, done: dict) -> dict:
    """build -> profile -> solve -> apply for one expert count; ``done`` holds steps finished before."""
    work = args.work / f"e{experts}"
    model, profile, plan, applied = work / "model", work / "profile.json", work / "plan.json", work / "applied"
    row = dict(done)
    py = sys.executable
    cmds = {
        "build": [py, __file__, "--build-only", str(model), "--experts", str(experts), "--moe-layers",
                  str(args.moe_layers), "--seed", str(args.seed)],
        "profile": [py, "-m", "profiling", "run", "--model", str(model), "--streamed", "--max-tokens",
                    str(args.tokens), "--window", "256", "--batch-size", "2", "--threads", str(args.threads),
                    "--measure", "none", "--formats", *FORMATS, "--no-progress", "-o", str(profile)],
        "solve": None,  # needs the build's size
        "apply": [py, "-m", "runtime", "apply", str(plan), "--model", str(model), "-o", str(applied), "--quiet",
                  "--overwrite"],
    }
    for step in STEPS:
        if step in row:
            continue
        work.mkdir(parents=True, exist_ok=True)
        if step == "solve":
            budget = int(0.30 * row["build"]["checkpoint_bytes"])
            cmds["solve"] = [py, "-m", "optimizer", "solve", str(profile), "--budget", str(budget), "--context",
                             "0", "--overhead", "0", "--expert-weight", "1", "-o", str(plan)]
        print(f"[E={experts}] {step} ...", flush=True)
        row[step] = run_child(cmds[step], work / f"{step}.log")
        if step == "build":
            row[step].update(json.loads((model / "build.json").read_text()))
        if step == "profile":
            d = json.loads(profile.with_name("profile.details.json").read_text())
            row[step].update(timings_s=d["timings_s"], reference_layer_s=d["reference_layer_s"],
                             reference_head_s=d["reference_head_s"], tokens=d["tokens"])
        if step == "apply":
            m = json.loads((applied / "moecc_manifest.json").read_text()) if (applied / "moecc_manifest.json"
                                                                             ).is_file() else {}
            row[step]["written_bytes"] = sum(p.stat().st_size for p in applied.glob("*.safetensors"))
            row[step]["manifest_weight_bytes"] = m.get("weight_bytes")
        save_row(args, experts, row)
        print(f"[E={experts}] {step}: {row[step]['seconds']:.0f} s, peak RSS "
              f"{row[step]['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def save_row(args, experts: int, row: dict) -> None:
    """Checkpoint the results file after every step (``--resume`` continues from it)."""
    doc = _load(args.output)
    doc.setdefault("runs", {})[str(experts)] = row
    doc["settings"] = {"moe_layers": args.moe_layers, "tokens": args.tokens, "threads": args.threads,
                       "seed": args.seed, "machine": _machine()}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=1) + "\n")


def _load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _machine() -> str:
    import torch

    return (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def full_model_bf16_bytes() -> int:
    """bf16 bytes of DeepSeek-V3's 61 layers + embeddings + head (no MTP layer), from its architecture."""
    from optimizer.architectures import architecture_from_config

    arch = architecture_from_config(reference_to_hf(json.loads(CONFIG.read_text()), str(CONFIG)))
    return 2 * arch.num_parameters


def moe_layer_params(experts: int) -> int:
    """Weights of one MoE decoder layer of the rehearsal model (V3's shapes) with ``experts`` routed experts."""
    import math

    return sum(math.prod(shape) for shape in checkpoint_shapes(rehearsal_config(experts, 1))["layer.1"].values())


def _moe_phases(run: dict) -> dict[str, float]:
    """Mean seconds per phase over the MoE layers of a profile run (layer 0 is the dense one)."""
    layers = run["profile"]["reference_layer_s"][1:]
    return {k: float(np.mean([t[k] for t in layers])) for k in layers[0]}


def scale_to(run: dict, experts: int, measured_experts: int) -> tuple[float, float]:
    """(seconds of one MoE layer's reference pass, streamed peak RSS) at ``experts``, from a run at
    ``measured_experts``: load, statistics and unload touch every weight, so they scale with the layer's
    weights P(E); the forward routes every token to the same k experts, so it does not; the peak RSS grows by
    the float32 bytes of the extra weights (one decoder layer is resident)."""
    ratio = moe_layer_params(experts) / moe_layer_params(measured_experts)
    ph = _moe_phases(run)
    seconds = ph["forward"] + ratio * (ph["load"] + ph["statistics"] + ph["unload"])
    rss = run["profile"]["peak_rss_bytes"] + 4 * (moe_layer_params(experts) - moe_layer_params(measured_experts))
    return seconds, float(rss)


def extrapolate(doc: dict) -> dict:
    """The full model from the largest measured E (:func:`scale_to`); with two or more E, the smaller ones
    check the model: each is predicted from the largest and compared with its measurement."""
    runs = {int(e): r for e, r in doc["runs"].items() if "profile" in r}
    if not runs:
        raise ValueError("no finished profile run to extrapolate from")
    top = max(runs)
    last = runs[top]
    layer_s, rss = scale_to(last, FULL_EXPERTS, top)
    ratio = moe_layer_params(FULL_EXPERTS) / moe_layer_params(top)
    stats_256 = _moe_phases(last)["statistics"] * ratio  # one quantized candidate (FORMATS)
    dense = sum(last["profile"]["reference_layer_s"][0].values())
    outer = last["profile"]["timings_s"]["load"] + last["profile"]["reference_head_s"]
    checks = {}
    for e, r in runs.items():
        if e != top:
            s_pred, m_pred = scale_to(last, e, top)
            checks[e] = {"layer_s": (s_pred, sum(_moe_phases(r).values())),
                         "rss": (m_pred, r["profile"]["peak_rss_bytes"])}
    applied = [r for r in runs.values() if "apply" in r]
    apply_rate = float(np.mean([r["build"]["checkpoint_bytes"] / r["apply"]["seconds"] for r in applied])) \
        if applied else None
    full_bytes = full_model_bf16_bytes()
    return {
        "from_experts": top, "moe_layer_s": layer_s, "peak_rss": rss, "checks": checks,
        "reference_pass_s": outer + FULL_DENSE_LAYERS * dense + FULL_MOE_LAYERS * layer_s,
        "statistics_256_s": stats_256,
        "layer_fp32_bytes": 4 * moe_layer_params(FULL_EXPERTS),
        "apply_s": full_bytes / apply_rate if apply_rate else None, "apply_bytes_per_s": apply_rate,
        "full_bf16_bytes": full_bytes,
        "apply_peak_rss": max((r["apply"]["peak_rss_bytes"] for r in applied), default=None),
    }


def report(doc: dict) -> str:
    """The committed markdown table: measured rows per E, then the extrapolation."""
    s = doc["settings"]
    gib = 2**30
    lines = [
        "# DeepSeek-V3-size rehearsal", "",
        "Generated by `python benchmarks/rehearsal_dsv3.py` (see its docstring for the command and the model): "
        f"V3's real layer shapes, 1 dense + {s['moe_layers']} MoE layers, random bf16 weights; "
        f"{s['tokens']} calibration tokens, {s['threads']} torch threads; {s['machine']}.", "",
        "| experts | checkpoint | build | profile (streamed) | profile peak RSS | MoE layer: load / forward / "
        "statistics | head | solve | apply | apply peak RSS |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for e, r in sorted(doc["runs"].items(), key=lambda kv: int(kv[0])):
        if "apply" not in r:
            continue
        p = r["profile"]
        moe = p["reference_layer_s"][1:]
        part = " / ".join(f"{np.mean([t[k] for t in moe]):.1f}" for k in ("load", "forward", "statistics"))
        a = r["apply"]
        lines.append(
            f"| {e} | {r['build']['checkpoint_bytes'] / gib:.2f} GiB | {r['build']['seconds']:.0f} s | "
            f"{p['seconds']:.0f} s | {p['peak_rss_bytes'] / gib:.2f} GiB | {part} s | {p['reference_head_s']:.1f} s | "
            f"{r['solve']['seconds']:.1f} s | {a['seconds']:.0f} s | {a['peak_rss_bytes'] / gib:.2f} GiB |")
    x = extrapolate(doc)
    lines += ["", f"## Extrapolated to the full model (61 layers, 256 experts, this CPU), from E = {x['from_experts']}",
              "", "Per MoE layer, load, statistics and unload scale with the layer's weights and the forward does "
              "not; the peak RSS grows by the float32 bytes of the extra experts (one layer resident).", ""]
    for e, c in sorted(x["checks"].items()):
        lines.append(f"- check at E = {e}: predicted {c['layer_s'][0]:.0f} s per MoE layer (measured "
                     f"{c['layer_s'][1]:.0f} s), peak RSS {c['rss'][0] / gib:.2f} GiB (measured "
                     f"{c['rss'][1] / gib:.2f});")
    lines += [
        f"- one MoE layer's reference pass at 256 experts: **{x['moe_layer_s'] / 60:.0f} min**; all 61 layers: "
        f"**{x['reference_pass_s'] / 3600:.1f} h** over {s['tokens']} tokens (the forward grows with tokens, load "
        "and statistics do not);",
        f"- of which the statistics (every block quantized once per quantized candidate) are "
        f"{x['statistics_256_s'] / 60:.0f} min per MoE layer with the one candidate here; the default six "
        f"candidates add {5 * x['statistics_256_s'] * FULL_MOE_LAYERS / 3600:.0f} h over the 58 MoE layers;",
        f"- streamed profiling's peak RSS at 256 experts: **{x['peak_rss'] / gib:.0f} GiB** (a 256-expert layer is "
        f"{x['layer_fp32_bytes'] / gib:.0f} GiB in float32): the 24 GiB goal is not met;",
    ]
    if x["apply_s"] is not None:
        rss = ", ".join(f"{r['apply']['peak_rss_bytes'] / gib:.2f} GiB at E = {e}"
                        for e, r in sorted(doc["runs"].items(), key=lambda kv: int(kv[0])) if "apply" in r)
        lines.append(f"- apply of the {x['full_bf16_bytes'] / 1e12:.2f} TB bf16 checkpoint at the measured "
                     f"{x['apply_bytes_per_s'] / 1e6:.0f} MB/s (mean over the runs): **{x['apply_s'] / 3600:.1f} h**. "
                     f"Its peak RSS ({rss}) follows the input shard it reads through safetensors' memory map "
                     "(mapped pages count in RSS; here one shard per layer, so it grows with E; a checkpoint's own "
                     "sharding bounds it); what apply itself holds is one tensor and its quantized parts.")
    lines += ["", "The runs shared the 2 cores with other jobs (tests of other work), so their seconds are noisy: "
              "the check above shows by how much. A GPU was not measured: profiling and apply run on the CPU."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experts", type=int, nargs="+", default=[24, 32], help="routed experts per MoE layer")
    p.add_argument("--moe-layers", type=int, default=2)
    p.add_argument("--tokens", type=int, default=512, help="calibration tokens of the profile")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=ROOT / "build" / "rehearsal")
    p.add_argument("-o", "--output", type=Path, default=ROOT / "benchmarks" / "results" / "rehearsal_dsv3.json")
    p.add_argument("--resume", action="store_true", help="keep the steps already in OUTPUT")
    p.add_argument("--keep", action="store_true", help="keep each model and its outputs under --work")
    p.add_argument("--report", type=Path, default=None, help="only rewrite the markdown table from this results file")
    p.add_argument("--build-only", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        if args.build_only:
            info = build(args.build_only, args.experts[0], args.moe_layers, args.seed)
            (args.build_only / "build.json").write_text(json.dumps(info))
            return 0
        if args.report is None:
            if args.output.exists() and not args.resume:
                raise ValueError(f"{args.output} exists: pass --resume to continue it, or remove it")
            doc = _load(args.output)
            for e in args.experts:
                run_steps(e, args, doc.get("runs", {}).get(str(e), {}))
                doc = _load(args.output)
        src = args.report or args.output
        md = src.with_suffix(".md")
        md.write_text(report(_load(src)))
        print(f"wrote {md}")
    except (ValueError, MoeccError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
