"""``python -m profiling validate``: does the profile's *sum of single effects* predict the loss of a plan?

For ``--plans`` random mixed plans (seeded) the plan is applied in memory all at once and the loss increase
is measured on the profile's calibration windows; the prediction of each *proxy* is the sum of its terms:

    predicted = sum_{pruned (l, e)} drop[l][e] + sum_l topk[l][k_l - 1] + sum_{kept blocks b} sens[b][f_b]
                (+ sum_l g_l(n_l), the prune curves' count term, for the optimizer's own objectives)

A plan (see :func:`random_plan`) draws a severity s in [0, 1]; per MoE layer it lowers top-k with
probability 0.6 s, prunes ~0.5 s of the experts it can spare (drawn with probability favouring low routing
mass; DeepSeek groups pruned evenly), and gives each kept quantizable block a random admissible format with
probability s (otherwise the most precise candidate). Applying: ``runtime.moe.set_top_k``, then
``runtime.moe.mask_experts`` (equivalent to dropping the experts), then ``runtime.quant.fake_quantize`` of
every block.

Proxies (terms that differ; the rest come from the profile):

* ``profile``: the optimizer's ``predicted_loss`` objective (measured prune cost, ``sensitivity.values``,
  ``topk_cost``), i.e. exactly what ``--formulation predicted_loss`` minimises;
* ``importance`` / ``routing_mass`` / ``saliency``: the optimizer's proxy objectives (drop cost = fitted
  scale x proxy share), with the profile's sensitivity and top-k cost;
* ``imatrix_kl_fit`` / ``imatrix_nll_fit``: the importance-matrix proxy for every block instead of measured
  sensitivities, scaled by the per-group fit (:mod:`profiling.fit`) against the measured KL / NLL increases;
* ``weight_error_kl_fit``: the plain ``||W - Q(W)||^2`` (no activation weighting), fitted against KL;
* ``measured_kl``: every term measured as KL(original || modified) (unmeasured blocks: ``imatrix_kl_fit``);
* ``measured_nll_raw``: every term the measured NLL increase, not clipped (unmeasured: ``imatrix_nll_fit``).

The report gives Spearman (and Pearson) correlation of each proxy with the measured NLL increase of the
plans (and Spearman with the plans' measured KL), and the worst plans of the best proxy. Unless
``--no-uniform``, one *uniform-format* plan per quantized candidate (nothing pruned, original k, every
block in that format) is measured too, and the Spearman over random + uniform plans is reported beside:
random plans rarely hold the trade-off a solver weighs most (a whole model a few bits lower versus pruning),
and on R3 the profile mispriced exactly that (docs/profiling.md, R3). Where the profile maps its objective to
KL (``prediction``, from ``fit-prediction`` on plans of another seed), the report adds the median measured /
predicted KL of the random plans through that map, its range and how many are within 2x.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from optimizer.errors import InputError
from optimizer.formats import get_format, same_bits_stand_in
from optimizer.profile import Profile, load_profile

from .meter import PlanMeter, profile_meter
from .model_io import ProfilingError
from .run import details_path


def random_plan(profile: Profile, rng: np.random.Generator) -> dict:
    a = profile.architecture
    s = float(rng.uniform(0.0, 1.0))
    plan = {"severity": s, "top_k": {}, "pruned": {}, "formats": {}}
    for i, m in enumerate(a.moe_layers):
        k = m.top_k
        if m.top_k > 1 and rng.random() < 0.6 * s:
            k = int(rng.integers(1, m.top_k))
        plan["top_k"][m.index] = k
        mass = np.asarray(profile.experts.routing_mass[i], float)
        groups = a.expert_groups
        size = m.num_experts // groups
        if groups > 1:  # even pruning per group; >= 2 per group and topk_groups * kept >= k
            min_keep = max(2, math.ceil(k / a.topk_groups))
            spare = size - min_keep
            r = int(rng.binomial(spare, 0.5 * s)) if spare > 0 else 0
            pruned = []
            for g in range(groups):
                idx = np.arange(g * size, (g + 1) * size)
                w = 1.0 / (mass[idx] + 1.0 / m.num_experts)
                pruned += rng.choice(idx, size=r, replace=False, p=w / w.sum()).tolist() if r else []
        else:
            spare = m.num_experts - max(k, 1)
            r = int(rng.binomial(spare, 0.5 * s)) if spare > 0 else 0
            w = 1.0 / (mass + 1.0 / m.num_experts)
            pruned = rng.choice(m.num_experts, size=r, replace=False, p=w / w.sum()).tolist() if r else []
        plan["pruned"][m.index] = sorted(int(e) for e in pruned)
    best = max(profile.formats, key=lambda f: get_format(f).bits_per_weight)
    for b in a.blocks:
        if not b.quantizable:
            continue
        if b.is_routed_expert and b.expert in plan["pruned"].get(b.layer, []):
            continue
        fits = [f for f in profile.formats if get_format(f).admits(b.shape)]
        top = max(fits, key=lambda f: get_format(f).bits_per_weight)
        plan["formats"][b.name] = str(rng.choice(fits)) if rng.random() < s else (best if best in fits else top)
    return plan


def uniform_plans(profile: Profile) -> list[dict]:
    """One plan per quantized candidate format f: nothing pruned, original k, every quantizable block in f
    (in its same-bits stand-in, else the most precise admissible format, where f cannot store it). These are
    the trade-offs a solver weighs against pruning; random plans rarely contain them."""
    a = profile.architecture
    plans = []
    for f in sorted((f for f in profile.formats if get_format(f).quantized),
                    key=lambda f: get_format(f).bits_per_weight):
        plan = {"severity": None, "kind": f"uniform {f}", "pruned": {m.index: [] for m in a.moe_layers},
                "top_k": {m.index: m.top_k for m in a.moe_layers}, "formats": {}}
        for b in a.blocks:
            if not b.quantizable:
                continue
            fits = [g for g in profile.formats if get_format(g).admits(b.shape)]
            plan["formats"][b.name] = (same_bits_stand_in(f, fits)
                                       or max(fits, key=lambda g: get_format(g).bits_per_weight))
        plans.append(plan)
    return plans


def _correlations(rows: list[dict], names) -> dict:
    from scipy.stats import pearsonr, spearmanr

    measured = np.array([r["measured_nll"] for r in rows])
    measured_kl = np.array([r["measured_kl"] for r in rows])
    corr = {}
    for name in names:
        pred = np.array([r["predicted"][name] for r in rows])
        ok = np.ptp(pred) > 0
        corr[name] = {"spearman": float(spearmanr(pred, measured).statistic) if ok else float("nan"),
                      "pearson": float(pearsonr(pred, measured).statistic) if ok else float("nan"),
                      "spearman_vs_kl": float(spearmanr(pred, measured_kl).statistic) if ok else float("nan"),
                      "median_ratio": float(np.median(pred[measured > 0] / measured[measured > 0]))
                      if np.any(measured > 0) else float("nan")}
    return corr


def _term_tables(profile: Profile, details: dict | None) -> dict[str, tuple[list, np.ndarray, list]]:
    """proxy -> (drop rows, sensitivity table [block, format], top-k rows[, count-term rows or None])."""
    from optimizer.formulation.objectives import build_objective

    out = {"profile": objective_terms(profile)}
    drop, format_cost, topk, _ = out["profile"]
    for name in ("importance", "routing_mass", "saliency"):
        try:
            t = build_objective(profile, name)
        except InputError:
            continue
        out[name] = (t.drop, t.format_cost, t.topk, t.prune_count)
    if details is None:
        return out
    from .fit import apply_fit, fit_proxy

    names = [b.name for b in profile.architecture.blocks]
    formats = list(profile.sensitivity.formats)
    groups = details["groups"]

    def table(cells: dict, fallback: np.ndarray) -> np.ndarray:
        t = np.array(fallback, dtype=float, copy=True)
        for i, n in enumerate(names):
            for j, f in enumerate(formats):
                v = cells.get(n, {}).get(f)
                if v is not None and np.isfinite(t[i, j]):
                    t[i, j] = v
        return t

    def fitted(raw: str, target: str) -> np.ndarray:
        return table(apply_fit(details[raw], fit_proxy(details[raw], details[target], groups), groups),
                     format_cost)

    def rows(raw, fallback):
        return tuple(np.array([fb if v is None else v for v, fb in zip(r, f)]) for r, f in zip(raw, fallback))

    imatrix_kl, imatrix_nll = fitted("proxy_raw", "measured_kl"), fitted("proxy_raw", "measured_nll")
    out["imatrix_kl_fit"] = (drop, imatrix_kl, topk)
    out["imatrix_nll_fit"] = (drop, imatrix_nll, topk)
    out["weight_error_kl_fit"] = (drop, fitted("weight_error_raw", "measured_kl"), topk)
    out["measured_kl"] = (rows(details["prune_kl"], drop), table(details["measured_kl"], imatrix_kl),
                          tuple(map(np.array, details["topk_kl"])))
    out["measured_nll_raw"] = (rows(details["prune_nll"], drop), table(details["measured_nll"], imatrix_nll),
                               tuple(map(np.array, details["topk_nll"])))
    return out


def predict(profile: Profile, plan: dict, terms: tuple) -> float:
    drop, sens, topk, *rest = terms
    count = rest[0] if rest else None
    a = profile.architecture
    col = {f: j for j, f in enumerate(profile.sensitivity.formats)}
    total = 0.0
    for i, m in enumerate(a.moe_layers):
        total += float(sum(drop[i][e] for e in plan["pruned"][m.index]))
        total += float(topk[i][plan["top_k"][m.index] - 1])
        if count is not None:
            total += float(count[i][len(plan["pruned"][m.index])])
    index = {b.name: i for i, b in enumerate(a.blocks)}
    for name, f in plan["formats"].items():
        total += float(sens[index[name], col[f]])
    return total


def objective_terms(profile: Profile) -> tuple:
    """The terms of the optimizer's ``predicted_loss`` objective, for :func:`predict`."""
    from optimizer.formulation.objectives import build_objective

    t = build_objective(profile, "predicted_loss")
    return t.drop, t.format_cost, t.topk, t.prune_count


def measure_plan(meter: PlanMeter, plan: dict) -> dict:
    """A plan of :func:`random_plan` / :func:`uniform_plans` measured: its summary row (no predictions)."""
    kl, dnll = meter.measure_spec(plan["top_k"], plan["pruned"], plan["formats"])
    bits = [get_format(f).bits_per_weight for f in plan["formats"].values()]
    return {"kind": plan.get("kind", "random"), "severity": plan["severity"], "measured_nll": dnll, "measured_kl": kl,
            "pruned": sum(len(v) for v in plan["pruned"].values()),
            "mean_top_k": float(np.mean(list(plan["top_k"].values()))),
            "mean_bits": float(np.mean(bits)) if bits else 0.0}


def read_details(profile_path: Path) -> dict | None:
    dpath = details_path(Path(profile_path))
    return json.loads(dpath.read_text()) if dpath.is_file() else None


def validate(profile_path: Path, model_dir: Path, plans: int = 20, data: str | None = None,
             max_tokens: int | None = None, seed: int = 0, progress: bool = True, uniform: bool = True) -> dict:
    profile = load_profile(profile_path)
    details = read_details(profile_path)
    if plans < 3:
        raise ProfilingError("--plans: need at least 3 plans for a correlation")
    meter = profile_meter(profile, details, model_dir, data, max_tokens, progress)
    terms = _term_tables(profile, details)
    rng = np.random.default_rng(seed)
    rows = []
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    todo = [random_plan(profile, rng) for _ in range(plans)] + (uniform_plans(profile) if uniform else [])
    for p in tqdm(range(len(todo)), desc="plans", disable=not progress, leave=False):
        row = {"plan": p, **measure_plan(meter, todo[p])}
        row["predicted"] = {name: predict(profile, todo[p], t) for name, t in terms.items()}
        rows.append(row)
    random_rows = [r for r in rows if r["kind"] == "random"]
    corr = _correlations(random_rows, terms)
    corr_all = _correlations(rows, terms) if len(rows) > len(random_rows) else {}
    best = max(corr, key=lambda n: -1 if math.isnan(corr[n]["spearman"]) else corr[n]["spearman"])
    worst = sorted(rows, key=lambda r: -abs(math.log((max(r["predicted"][best], 1e-9)) / max(r["measured_nll"], 1e-9))))
    uniform_rows = [{"kind": r["kind"], "measured_nll": r["measured_nll"], "measured_kl": r["measured_kl"],
                     "predicted_profile": r["predicted"]["profile"]} for r in rows if r["kind"] != "random"]
    return {"profile": str(profile_path), "model": str(model_dir), "data": meter.source, "tokens": meter.engine.tokens,
            "plans": plans, "seed": seed, "reference_nll": meter.engine.ref_nll, "seconds": time.perf_counter() - t0,
            "correlation": corr, "correlation_with_uniform": corr_all, "uniform": uniform_rows,
            "prediction": _prediction_check(profile, random_rows),
            "best_proxy": best, "worst": [r["plan"] for r in worst[:5]], "rows": rows}


def _prediction_check(profile: Profile, rows: list[dict]) -> dict | None:
    """How the profile's objective -> KL map (if any) predicts the measured KL of the random plans."""
    if profile.prediction is None:
        return None
    ratio = np.array([r["measured_kl"] / max(profile.prediction.kl(r["predicted"]["profile"]), 1e-12) for r in rows])
    return {"scale": profile.prediction.scale, "exponent": profile.prediction.exponent,
            "fitted_on": profile.prediction.plans, "median_measured_over_predicted_kl": float(np.median(ratio)),
            "min_ratio": float(ratio.min()), "max_ratio": float(ratio.max()),
            "within_2x": int(np.sum((ratio >= 0.5) & (ratio <= 2.0))), "plans": len(rows)}


def print_validation(res: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    t = Table(title=f"additivity: {res['plans']} random plans, {res['tokens']:,} tokens of {res['data']}")
    with_uniform = res.get("correlation_with_uniform") or {}
    cols = ["proxy", "Spearman (NLL)", "Pearson (NLL)", "Spearman (KL)", "median predicted/measured NLL"]
    if with_uniform:
        cols.append(f"Spearman (NLL), + {len(res['uniform'])} uniform-format plans")
    for col in cols:
        t.add_column(col, justify="right")
    for name, c in sorted(res["correlation"].items(), key=lambda kv: -np.nan_to_num(kv[1]["spearman"], nan=-2)):
        row = [name, f"{c['spearman']:.3f}", f"{c['pearson']:.3f}", f"{c['spearman_vs_kl']:.3f}",
               f"{c['median_ratio']:.3g}"]
        if with_uniform:
            row.append(f"{with_uniform[name]['spearman']:.3f}")
        t.add_row(*row)
    console.print(t)
    if res.get("uniform"):
        u = Table(title="uniform-format plans (nothing pruned, original k): what the profile predicts")
        for col in ("plan", "predicted (profile)", "measured NLL", "measured KL"):
            u.add_column(col, justify="right")
        for r in res["uniform"]:
            u.add_row(r["kind"], f"{r['predicted_profile']:.4g}", f"{r['measured_nll']:.4g}", f"{r['measured_kl']:.4g}")
        console.print(u)
    w = Table(title=f"worst plans for the best proxy ({res['best_proxy']})")
    for col in ("plan", "severity", "pruned", "mean k", "mean bits", "predicted", "measured NLL", "measured KL"):
        w.add_column(col, justify="right")
    by = {r["plan"]: r for r in res["rows"]}
    for p in res["worst"]:
        r = by[p]
        w.add_row(str(p) if r.get("kind", "random") == "random" else r["kind"],
                  "-" if r["severity"] is None else f"{r['severity']:.2f}", str(r["pruned"]), f"{r['mean_top_k']:.2f}",
                  f"{r['mean_bits']:.2f}",
                  f"{r['predicted'][res['best_proxy']]:.4g}", f"{r['measured_nll']:.4g}", f"{r['measured_kl']:.4g}")
    console.print(w)
    pred = res.get("prediction")
    if pred:
        console.print(f"the profile's objective -> KL map (KL ~ {pred['scale']:.4g} O^{pred['exponent']:.3g}, "
                      f"fitted on {pred['fitted_on']} other plans): median measured/predicted KL "
                      f"{pred['median_measured_over_predicted_kl']:.3g} over the {pred['plans']} random plans "
                      f"(range {pred['min_ratio']:.3g}-{pred['max_ratio']:.3g}; {pred['within_2x']} within 2x)")
    console.print(f"reference NLL {res['reference_nll']:.4f}; {res['seconds']:.1f} s for the plans")
