"""Objective registry. Every objective is additive predicted damage, in nats per token, to be minimised:

    J = sum_{l,e} drop[l,e] * (1 - keep[l,e])      (pruning)
      + sum_{b,f} sens[b,f] * x[b,f]                 (quantization: profile sensitivities)
      + sum_{l,k} topk[l,k] * y[l,k]                 (routing to fewer experts: profile top-k cost)
      + sum_l g_l(n_l)                               (pruning n_l experts together: the measured curve)

Objectives differ in how they price dropping an expert. Proxy-based ones (the paper's importance, routing
mass, REAP saliency) turn an expert's share of the layer's proxy into nats with a per-layer scale
``lambda_l``, fitted by least squares through the origin on the experts whose prune cost the profile
measured (``lambda_l = sum_e c_e p_e / sum_e p_e^2``; layers without measurements use the global fit), or
given with ``expert_weight``.

Where the profile measured a prune curve for layer l (``experts.prune_curve``: C_l(n) for removing its first n
experts in the curve's order together), the count term corrects the sum of single costs to it, for every
objective:

    g_l(n) = C_l(n) - S_l(n) - topk[l, k_l(n)],   S_l(n) = the n smallest drop[l, e],

with C_l interpolated linearly between the measured counts, anchored at C_l(0) = 0 and C_l(1) = S_l(1) +
topk[l, k_l(1)] (the cheapest single, as measured), g_l constant past the last count, and k_l(n) the top-k
the curve is measured at (:func:`optimizer.profile.served_top_k`: min(K_l, E_l - n) for ungrouped routers).
A plan that prunes the objective's n cheapest experts and routes to k_l(n) is priced at the (interpolated)
measurement, and any other set of n pays its own costs' excess over theirs: an expert's own term still
decides which experts go, the curve how many. The cost, not the excess, is interpolated: the excess jumps
where k_l(n) does (on R4, k = 8 at n = 24 and 1 at n = 31), and interpolating it priced pruning 30 of 32
experts at 0.
A researcher adds an objective by writing one function::

    @register_objective("my_objective", "one line on what it prices")
    def my_objective(profile: Profile, options: ObjectiveOptions) -> ObjectiveTerms: ...
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from ..errors import InputError
from ..profile import Profile, served_top_k


@dataclass(frozen=True)
class ObjectiveOptions:
    importance_alpha: float = 0.5  # a in I_e = a f_e + (1 - a) s_e
    expert_weight: float | None = None  # nats for dropping a whole layer's proxy mass; None = fit to prune_cost
    prune_curve: bool = True  # price the number pruned per layer by the profile's prune curves, where measured


@dataclass(frozen=True, eq=False)
class ObjectiveTerms:
    """Linear costs: ``drop[i][e]`` per MoE layer i, ``format_cost[b, f]`` over profile.sensitivity.formats
    (NaN where not applicable), ``topk[i][k-1]``; ``prune_count[i][n]``: g_i(n) for n = 0..E_i pruned
    (None: no layer has a prune curve, or curves are switched off)."""

    name: str
    drop: tuple[np.ndarray, ...]
    format_cost: np.ndarray
    topk: tuple[np.ndarray, ...]
    description: str
    prune_count: tuple[np.ndarray, ...] | None = None


ObjectiveFn = Callable[[Profile, ObjectiveOptions], ObjectiveTerms]
OBJECTIVES: dict[str, tuple[ObjectiveFn, str]] = {}


def register_objective(name: str, summary: str) -> Callable[[ObjectiveFn], ObjectiveFn]:
    def wrap(fn: ObjectiveFn) -> ObjectiveFn:
        if name in OBJECTIVES:
            raise ValueError(f"objective {name!r} registered twice")
        OBJECTIVES[name] = (fn, summary)
        return fn

    return wrap


def get_objective(name: str) -> ObjectiveFn:
    if name not in OBJECTIVES:
        raise InputError(f"--formulation: unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name][0]


def build_objective(profile: Profile, name: str, options: ObjectiveOptions | None = None) -> ObjectiveTerms:
    options = options or ObjectiveOptions()
    terms = get_objective(name)(profile, options)
    for i, d in enumerate(terms.drop):
        if not np.all(np.isfinite(d)) or np.any(d < 0):
            raise InputError(f"objective {name}: drop costs of MoE layer {i} must be finite and >= 0")
    if options.prune_curve and profile.experts.prune_curve is not None:
        terms = replace(terms, prune_count=prune_count_costs(profile, terms.drop, terms.topk))
    return terms


def prune_count_costs(profile: Profile, drop: tuple[np.ndarray, ...],
                      topk: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """g_i(n), n = 0..E_i, of every MoE layer (zeros where no curve was measured; see the module docstring)."""
    arch = profile.architecture
    out = []
    for m, curve, d, t in zip(arch.moe_layers, profile.experts.prune_curve, drop, topk):
        E = m.num_experts
        n = np.arange(E + 1)
        served = [max(1, served_top_k(m.top_k, E, arch.expert_groups, arch.topk_groups, j)) for j in n]
        floor = np.concatenate([[0.0], np.cumsum(np.sort(np.asarray(d, float)))])  # S(n)
        floor = floor + np.asarray(t, float)[np.array(served) - 1]  # + topk at k_l(n)
        if curve is None:
            out.append(np.zeros(E + 1))
            continue
        # the cost itself is interpolated, anchored at n = 0 (free) and n = 1 (the cheapest single, as measured);
        # interpolating the excess instead would carry the top-k jump of one measured count into its neighbours
        counts = np.asarray(curve.counts, int)
        at = np.concatenate([[0], [1] if counts[0] > 1 else [], counts])
        cost = np.concatenate([[0.0], [floor[1]] if counts[0] > 1 else [], np.asarray(curve.cost, float)])
        g = np.maximum(np.interp(n, at, cost), 0.0) - floor
        g[counts[-1] + 1:] = g[counts[-1]]  # past the last count, each further expert pays its own costs
        g[0] = 0.0
        out.append(g)
    return tuple(out)


# --------------------------------------------------------------------------------------------- helpers
def _shares(values: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    out = []
    for v in values:
        total = float(np.sum(v))
        out.append(np.asarray(v, float) / total if total > 0 else np.full(len(v), 1.0 / len(v)))
    return out


def proxy_scales(profile: Profile, shares: list[np.ndarray], options: ObjectiveOptions, proxy: str) -> np.ndarray:
    """Per-layer ``lambda_l`` turning proxy shares into nats (see the module docstring)."""
    n = len(shares)
    if options.expert_weight is not None:
        if not np.isfinite(options.expert_weight) or options.expert_weight < 0:
            raise InputError("--expert-weight: must be a finite number >= 0")
        return np.full(n, float(options.expert_weight))
    pc = profile.experts.prune_cost
    if pc is None or not any(np.any(np.isfinite(c)) for c in pc):
        raise InputError(
            f"objective using {proxy}: the profile has no measured experts.prune_cost to calibrate it; "
            "pass --expert-weight (nats lost if a layer's whole proxy mass were dropped)"
        )
    num = np.array([np.nansum(np.where(np.isfinite(c), c * s, np.nan)) for c, s in zip(pc, shares)])
    den = np.array([np.nansum(np.where(np.isfinite(c), s * s, np.nan)) for c, s in zip(pc, shares)])
    global_scale = num.sum() / den.sum() if den.sum() > 0 else 0.0
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), global_scale)


def _proxy_objective(profile: Profile, options: ObjectiveOptions, name: str, proxy: list[np.ndarray],
                     description: str) -> ObjectiveTerms:
    shares = _shares(tuple(proxy))
    scales = proxy_scales(profile, shares, options, name)
    drop = tuple(s * lam for s, lam in zip(shares, scales))
    return ObjectiveTerms(name, drop, profile.sensitivity.values, profile.topk_cost.values, description)


# ------------------------------------------------------------------------------------------ objectives
@register_objective("importance", "CC-MoE's linear importance I_e = a f_e + (1-a) s_e (a = 0.5)")
def importance(profile: Profile, options: ObjectiveOptions) -> ObjectiveTerms:
    a = options.importance_alpha
    if not 0.0 <= a <= 1.0:
        raise InputError(f"--importance-alpha: must lie in [0, 1], got {a}")
    f = _shares(profile.experts.frequency)
    s = _shares(profile.experts.mean_score)
    proxy = [a * fi + (1 - a) * si for fi, si in zip(f, s)]
    return _proxy_objective(profile, options, "importance", proxy,
                            f"drop cost = lambda_l * (a f + (1-a) s), a = {a}, f and s normalised per layer")


@register_objective("routing_mass", "share of the layer's summed routing weight")
def routing_mass(profile: Profile, options: ObjectiveOptions) -> ObjectiveTerms:
    return _proxy_objective(profile, options, "routing_mass", list(profile.experts.routing_mass),
                            "drop cost = lambda_l * routing-mass share")


@register_objective("saliency", "REAP saliency: router-weighted norm of the expert's output")
def saliency(profile: Profile, options: ObjectiveOptions) -> ObjectiveTerms:
    if profile.experts.saliency is None:
        raise InputError("--formulation saliency: the profile has no experts.saliency (profile with REAP saliency)")
    return _proxy_objective(profile, options, "saliency", list(profile.experts.saliency),
                            "drop cost = lambda_l * REAP-saliency share")


@register_objective("predicted_loss", "measured prune cost + block sensitivity + top-k cost (additive)")
def predicted_loss(profile: Profile, options: ObjectiveOptions) -> ObjectiveTerms:
    pc = profile.experts.prune_cost
    if pc is None:
        raise InputError("--formulation predicted_loss: the profile has no experts.prune_cost")
    mass = _shares(profile.experts.routing_mass)
    scales = proxy_scales(profile, mass, options, "routing_mass")
    # Experts whose prune cost was not measured are priced by the routing-mass fit of their layer.
    drop = tuple(np.where(np.isfinite(c), c, s * lam) for c, s, lam in zip(pc, mass, scales))
    return ObjectiveTerms("predicted_loss", drop, profile.sensitivity.values, profile.topk_cost.values,
                          "drop cost = measured prune cost (unmeasured experts: routing-mass fit)")
