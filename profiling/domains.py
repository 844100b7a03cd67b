"""``python -m profiling compare-domains A.json B.json``: do two calibration sets keep the same experts?

Both profiles must describe the same architecture (e.g. one profiled on ``english:calibration``, one on
``code:calibration``). For every importance measure and MoE layer, each profile keeps its top
``ceil(keep x num_experts)`` experts (ties broken by expert index); the table reports the Jaccard index
``|K_A & K_B| / |K_A | K_B|`` of the two kept sets, averaged over layers (1 = same experts), and the Spearman
correlation of the two importance vectors.

Importances: ``frequency``, ``mean_score``, ``routing_mass``, ``saliency`` (REAP), ``importance``
(CC-MoE ``0.5 f + 0.5 s`` of per-layer shares) and ``prune_cost`` (only where both profiles measured
every expert of the layer).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from optimizer.profile import Profile, load_profile

from .model_io import ProfilingError


def _importances(p: Profile) -> dict[str, list[np.ndarray] | None]:
    e = p.experts

    def share(rows):
        return [np.asarray(r, float) / max(float(np.sum(r)), 1e-300) for r in rows]

    out = {"frequency": list(e.frequency), "mean_score": list(e.mean_score), "routing_mass": list(e.routing_mass),
           "saliency": list(e.saliency) if e.saliency is not None else None,
           "importance": [0.5 * f + 0.5 * s for f, s in zip(share(e.frequency), share(e.mean_score))],
           "prune_cost": list(e.prune_cost) if e.prune_cost is not None else None}
    return out


def kept(values: np.ndarray, keep: float) -> set[int]:
    n = len(values)
    m = max(1, min(n, math.ceil(keep * n)))
    order = sorted(range(n), key=lambda i: (-values[i], i))
    return set(order[:m])


def jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def compare_domains(path_a: Path, path_b: Path, keep: float = 0.5) -> dict:
    from scipy.stats import spearmanr

    if not 0 < keep <= 1:
        raise ProfilingError(f"--keep: a fraction in (0, 1], got {keep}")
    a, b = load_profile(path_a), load_profile(path_b)
    la, lb = a.architecture.moe_layers, b.architecture.moe_layers
    if [(m.index, m.num_experts) for m in la] != [(m.index, m.num_experts) for m in lb]:
        raise ProfilingError(f"{path_a} and {path_b} describe different MoE layers; profile the same model twice")
    ia, ib = _importances(a), _importances(b)
    out = {"a": str(path_a), "b": str(path_b), "keep": keep,
           "source_a": a.experts.measurement.source, "source_b": b.experts.measurement.source, "measures": {}}
    for name in ia:
        if ia[name] is None or ib[name] is None:
            continue
        per_layer, rhos = [], []
        for i, m in enumerate(la):
            va, vb = np.asarray(ia[name][i], float), np.asarray(ib[name][i], float)
            if not (np.all(np.isfinite(va)) and np.all(np.isfinite(vb))):
                per_layer.append(None)
                continue
            per_layer.append(jaccard(kept(va, keep), kept(vb, keep)))
            if np.ptp(va) > 0 and np.ptp(vb) > 0:
                rhos.append(float(spearmanr(va, vb).statistic))
        vals = [v for v in per_layer if v is not None]
        if not vals:
            continue
        out["measures"][name] = {"mean_jaccard": float(np.mean(vals)), "min_jaccard": float(np.min(vals)),
                                 "per_layer": per_layer, "mean_spearman": float(np.mean(rhos)) if rhos else None}
    return out


def print_domains(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"kept experts ({res['keep']:.0%} per layer): {res['source_a']} vs {res['source_b']}")
    for col in ("importance", "mean Jaccard", "min Jaccard", "mean Spearman", "per layer"):
        t.add_column(col, justify="right")
    for name, m in res["measures"].items():
        layers = " ".join("-" if v is None else f"{v:.2f}" for v in m["per_layer"])
        rho = "-" if m["mean_spearman"] is None else f"{m['mean_spearman']:.3f}"
        t.add_row(name, f"{m['mean_jaccard']:.3f}", f"{m['min_jaccard']:.3f}", rho, layers)
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    console.print(t)
