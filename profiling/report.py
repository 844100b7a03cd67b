"""Rich summary tables printed at the end of ``python -m profiling run``."""
from __future__ import annotations

import math

import numpy as np
from rich.console import Console
from rich.table import Table

from optimizer.profile import Profile


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "-" if v is None or not math.isfinite(v) else format(v, spec)


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(max(len(p), 2))) if len(p) > 1 else 0.0


def print_summary(profile: Profile, details: dict, console: Console | None = None) -> None:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)
    a = profile.architecture
    t = Table(title=f"{profile.model.name}: MoE layers ({details['tokens']:,} tokens of {details['data']})")
    for col in ("layer", "experts", "top-k", "max/mean freq", "norm. entropy", "prune cost median",
                "prune cost max", "top-k cost k=1"):
        t.add_column(col, justify="right")
    pc = profile.experts.prune_cost
    for i, m in enumerate(a.moe_layers):
        f = np.asarray(profile.experts.frequency[i])
        row = pc[i] if pc is not None else np.array([np.nan])
        fin = row[np.isfinite(row)]
        t.add_row(str(m.index), str(m.num_experts), str(m.top_k), _fmt(float(f.max() * len(f)), ".2f"),
                  _fmt(_entropy(f), ".3f"), _fmt(float(np.median(fin)) if len(fin) else None),
                  _fmt(float(fin.max()) if len(fin) else None),
                  _fmt(float(profile.topk_cost.values[i][0]) if m.top_k > 1 else 0.0))
    console.print(t)

    s = Table(title="block sensitivity (nats/token): median over blocks, measured / fitted proxy")
    s.add_column("format")
    kinds = sorted({b.kind.value for b in a.blocks if b.quantizable})
    for k in kinds:
        s.add_column(k, justify="right")
    s.add_column("bytes/s (dequant+matmul)", justify="right")
    measured = set(details.get("measured_blocks", []))
    for j, f in enumerate(profile.sensitivity.formats):
        cells = []
        for k in kinds:
            vals_m = [profile.sensitivity.values[i, j] for i, b in enumerate(a.blocks)
                      if b.kind.value == k and b.quantizable and b.name in measured]
            vals_p = [details["proxy_fitted"].get(b.name, {}).get(f) for b in a.blocks
                      if b.kind.value == k and b.quantizable]
            vm = [v for v in vals_m if np.isfinite(v)]
            vp = [v for v in vals_p if v is not None]
            cells.append(f"{_fmt(float(np.median(vm)) if vm else None)} / {_fmt(float(np.median(vp)) if vp else None)}")
        tp = profile.device.format_throughput.get(f)
        s.add_row(f, *cells, _fmt(tp, ".3g"))
    console.print(s)

    d = details
    fit = d.get("proxy_fit", {})
    info = Table(show_header=False, title="run")
    info.add_column("what")
    info.add_column("value")
    info.add_row("reference NLL", f"{d['reference_nll']:.4f} nats/token")
    info.add_row("memory bandwidth", f"{profile.device.memory_bandwidth_bytes_per_s / 1e9:.2f} GB/s")
    info.add_row("measured blocks", f"{len(measured)} of {len(d['blocks'])}")
    info.add_row("proxy fit (global scale)", _fmt(fit.get("global_scale")))
    info.add_row("mode", "streamed (one decoder layer in memory)" if d["streamed"] else "in memory")
    info.add_row("peak RSS", f"{d['peak_rss_bytes'] / 2**20:,.0f} MiB")
    info.add_row("time", ", ".join(f"{k} {v:.1f}s" for k, v in d["timings_s"].items()))
    info.add_row("wrote", f"{d['profile']} ({d['profile_hash'][:19]}...) + details")
    console.print(info)
