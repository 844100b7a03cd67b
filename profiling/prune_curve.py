"""``python -m profiling prune-curve PROFILE --model DIR -o OUT``: the cost of pruning experts together.

Single-expert prune costs do not add up once routing flips: on R3, pruning 8 of a layer's 16 experts costs
0.36-0.86x the sum of their single costs, 15 of 16 up to 2.9x. This step measures, for every MoE layer l and
a few counts n, the cost of removing the first n experts of a ranking at once:

    C_l(n) = cost( experts order_l[:n] masked out of layer l, which routes to k_l(n) ),
    k_l(n) = min(K_l, E_l - n)    (grouped routers: min(K_l, TG (E_l - n) / G), what the kept groups can serve)

``order_l`` ranks the layer's experts by the drop costs of an objective (``--ranking``; default
``predicted_loss``, the measured single costs), cheapest first; in grouped layers the ranks are interleaved
over groups so that every prefix of a multiple of G takes equally many experts from each group. Default
counts: E/8, E/4, E/2, 3E/4 and E - 1 (rounded to multiples of G, deduplicated); n = 1 is the single
cost already in the profile. ``cost`` is the profile's own measure (its details file's ``cost``: KL or NLL
increase, nats/token) on its calibration windows.

OUT is PROFILE with ``experts.prune_curve`` set; the optimizer prices the number pruned per layer with it
(the count term g_l(n) of :mod:`optimizer.formulation.objectives`), while each expert's own drop cost still
decides which experts go. Each perturbation starts at its layer (:mod:`profiling.engine`), so a point costs
about (L - l) / L of a full pass. Measurements are journaled to ``OUT.prune_curve.jsonl`` (``--resume``).
"""
from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from optimizer.errors import InputError
from optimizer.formulation.objectives import build_objective
from optimizer.jsonio import write_json
from optimizer.profile import Measurement, Profile, PruneCurve, save_profile, served_top_k, with_costs

from .calibrate import read_profile_details
from .engine import Perturbation
from .journal import Journal, model_fingerprint
from .measure import top_k_set
from .meter import PlanMeter
from .run import details_path

DEFAULT_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 3 / 4)


def default_counts(experts: int, groups: int) -> list[int]:
    """E/8, E/4, E/2, 3E/4 and E - 1, rounded to multiples of ``groups``, within [max(2, G), E - G]."""
    raw = [round(experts * f / groups) * groups for f in DEFAULT_FRACTIONS] + [experts - groups]
    return sorted({n for n in raw if max(2, groups) <= n <= experts - groups})


def ranking(drops: tuple[np.ndarray, ...], groups: int) -> list[np.ndarray]:
    """Per MoE layer: experts by ascending drop cost (an objective's ``drop``), interleaved over ``groups``."""
    out = []
    for drop in drops:
        d = np.asarray(drop, float)
        size = len(d) // groups
        per_group = [g * size + np.argsort(d[g * size:(g + 1) * size], kind="stable") for g in range(groups)]
        order = []
        for rank in range(size):
            ids = np.array([pg[rank] for pg in per_group])
            order.extend(ids[np.argsort(d[ids], kind="stable")].tolist())
        out.append(np.array(order, dtype=int))
    return out


def check_counts(counts: list[int], experts: int, groups: int) -> None:
    bad = [n for n in counts if not 1 <= n <= experts - 1 or n % groups]
    if bad:
        raise InputError(f"--counts: {bad} not in [1, {experts - 1}]" + (f" or not a multiple of the {groups} "
                                                                         "expert groups" if groups > 1 else ""))


def measure_curves(meter: PlanMeter, profile: Profile, orders: list[np.ndarray], counts: list[list[int]],
                   cost: str) -> list[PruneCurve]:
    """Every (layer, count) point as one engine perturbation starting at its layer."""
    from runtime.moe import mask_experts

    arch, model = profile.architecture, meter.runner.model
    G, TG = arch.expert_groups, arch.topk_groups

    def pruned(layer: int, experts: list[int], k: int) -> Callable[[], ExitStack]:
        def apply() -> ExitStack:
            stack = ExitStack()
            stack.enter_context(top_k_set(model, layer, k))
            stack.enter_context(mask_experts(model, {layer: experts}))
            return stack
        return apply

    perts = []
    for i, (m, order, ns) in enumerate(zip(arch.moe_layers, orders, counts)):
        for n in ns:
            k = served_top_k(m.top_k, m.num_experts, G, TG, n)
            perts.append(Perturbation((i, n), m.index, pruned(m.index, order[:n].tolist(), k)))
    effects = meter.engine.evaluate(perts, "prune curve")
    return [PruneCurve(order, np.array(ns, dtype=int),
                       np.array([max(0.0, getattr(effects[(i, n)], "kl" if cost == "kl" else "dnll")) for n in ns]))
            for i, (order, ns) in enumerate(zip(orders, counts))]


def run_prune_curve(args) -> dict:  # noqa: ANN001 - the argparse namespace of ``python -m profiling prune-curve``
    """The CLI: measure, write OUT (the profile with curves) and its details file (``prune_curve`` added)."""
    t0 = time.perf_counter()
    profile, details = read_profile_details(args.profile)
    arch = profile.architecture
    G = arch.expert_groups
    counts = []
    for m in arch.moe_layers:
        ns = sorted(set(args.counts)) if args.counts else default_counts(m.num_experts, G)
        check_counts(ns, m.num_experts, G)
        counts.append(ns)
    objective = args.ranking or ("predicted_loss" if profile.experts.prune_cost is not None else "routing_mass")
    drops = build_objective(profile, objective).drop
    orders = ranking(drops, G)
    out = Path(args.output)
    cost = details.get("cost", "kl")
    meter = PlanMeter(profile, Path(args.model), details["data"], args.max_tokens or details["tokens"],
                      details["window"], not args.no_progress)
    journal = out.with_name(out.name + ".prune_curve.jsonl")
    meter.engine.journal = Journal(journal, {"model": model_fingerprint(args.model), "profile": profile.hash,
                                             "data": details["data"], "tokens": meter.engine.tokens,
                                             "window": details["window"], "ranking": objective,
                                             "counts": counts}, resume=args.resume)
    meter.engine.journal.check_reference(meter.engine.ref_nll)
    curves = measure_curves(meter, profile, orders, counts, cost)
    seconds = time.perf_counter() - t0
    measurement = Measurement(
        method=f"{'KL' if cost == 'kl' else 'NLL'} increase (nats/token) when the first n experts of the "
               f"{objective} ranking are masked out of a layer together (runtime.moe.mask_experts), the layer routing "
               f"to the largest top-k the rest can serve; counts {sorted({n for ns in counts for n in ns})}",
        tokens=meter.engine.tokens, source=details["data"])
    new = with_costs(profile, experts=replace(profile.experts, prune_curve=tuple(curves),
                                           prune_curve_measurement=measurement))
    digest = save_profile(new, out)
    summary = _summary(curves, drops)
    details.update(profile=out.name, profile_hash=digest,
                   prune_curve={"ranking": objective, "cost": cost, "tokens": meter.engine.tokens,
                                "seconds": round(seconds, 1), "points": sum(len(ns) for ns in counts),
                                "ratio_to_singles": summary})
    write_json(details_path(out), details, indent=None)
    meter.engine.journal.close(delete=True)
    print(f"{sum(len(ns) for ns in counts)} points in {seconds:.0f} s; measured / summed single costs, median over "
          "layers: " + ", ".join(f"n={n}: {r:.2f}" for n, r in summary.items()))
    print(f"wrote {out} and {details_path(out)}")
    return summary


def _summary(curves: list[PruneCurve], drops: tuple[np.ndarray, ...]) -> dict[str, float]:
    """Median over layers of C(n) / (sum of the n pruned experts' single drop costs)."""
    ratios: dict[int, list[float]] = {}
    for c, single in zip(curves, drops):
        for n, cost in zip(c.counts.tolist(), c.cost.tolist()):
            s = float(np.sum(np.asarray(single)[c.order[:n]]))
            if s > 0:
                ratios.setdefault(n, []).append(cost / s)
    return {str(n): float(np.median(v)) for n, v in sorted(ratios.items())}
