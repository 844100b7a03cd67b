"""``python -m profiling inspect profile.json``: how well the cheap proxies track the measured effects.

Reads the profile and its details file and prints Spearman correlations over the measured cells:

* single blocks (quantized formats only): measured KL vs the raw importance-matrix proxy, vs the plain weight
  error, vs the measured NLL increase; the fitted proxy vs the measured KL (and their median ratio);
* single experts: per MoE layer, the measured prune cost vs each routing statistic (mean over layers).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from optimizer.formats import get_format
from optimizer.profile import load_profile

from .model_io import ProfilingError
from .run import details_path


def _rho(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic) if len(a) > 2 and np.ptp(a) > 0 and np.ptp(b) > 0 else float("nan")


def inspect_profile(path: Path) -> dict:
    p = load_profile(path)
    dpath = details_path(Path(path))
    if not dpath.is_file():
        raise ProfilingError(f"{dpath}: no details file next to the profile")
    d = json.loads(dpath.read_text())
    cols: dict[str, list[float]] = {k: [] for k in ("kl", "nll", "proxy", "weight", "fitted")}
    for name in d["measured_blocks"]:
        for f, kl in d["measured_kl"].get(name, {}).items():
            if not get_format(f).quantized:
                continue
            cols["kl"].append(kl)
            cols["nll"].append(d["measured_nll"][name][f])
            cols["proxy"].append(d["proxy_raw"][name][f])
            cols["weight"].append(d["weight_error_raw"][name][f])
            cols["fitted"].append(d["proxy_fitted"][name][f])
    kl = np.array(cols["kl"])
    out = {"pairs": len(kl), "blocks": {
        "kl_vs_imatrix": _rho(cols["proxy"], kl), "kl_vs_weight_error": _rho(cols["weight"], kl),
        "kl_vs_nll": _rho(cols["nll"], kl), "kl_vs_fitted_imatrix": _rho(cols["fitted"], kl),
        "fitted_over_kl_median": (float(np.median(np.array(cols["fitted"]) / np.maximum(kl, 1e-30)))
                                  if len(kl) else None)},
        "experts": {}}
    pc = p.experts.prune_cost
    if pc is not None:
        for stat in ("frequency", "mean_score", "routing_mass", "saliency"):
            rows = getattr(p.experts, stat)
            if rows is None:
                continue
            rhos = []
            for v, c in zip(rows, pc):
                ok = np.isfinite(c)
                rhos.append(_rho(np.asarray(v)[ok], np.asarray(c)[ok]))
            out["experts"][f"prune_cost_vs_{stat}"] = float(np.nanmean(rhos)) if rhos else None
    return out


def print_inspection(res: dict) -> None:
    print(f"single blocks ({res['pairs']} measured block x format pairs), Spearman:")
    for k, v in res["blocks"].items():
        print(f"  {k:24s} {v:.3f}" if v is not None else f"  {k:24s} -")
    print("single experts, mean per-layer Spearman:")
    for k, v in res["experts"].items():
        print(f"  {k:30s} {v:.3f}")
