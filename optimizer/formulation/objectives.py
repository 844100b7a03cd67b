"""Objective registry. Every objective is additive predicted damage, in nats per token, to be minimised:

    J = sum_{l,e} drop[l,e] * (1 - keep[l,e])      (pruning)
      + sum_{b,f} sens[b,f] * x[b,f]                 (quantization: profile sensitivities)
      + sum_{l,k} topk[l,k] * y[l,k]                 (routing to fewer experts: profile top-k cost)

Objectives differ in how they price dropping an expert. Proxy-based ones (the paper's importance, routing
mass, REAP saliency) turn an expert's share of the layer's proxy into nats with a per-layer scale
``lambda_l``, fitted by least squares through the origin on the experts whose prune cost the profile
measured (``lambda_l = sum_e c_e p_e / sum_e p_e^2``; layers without measurements use the global fit), or
given with ``expert_weight``. A researcher adds an objective by writing one function::

    @register_objective("my_objective", "one line on what it prices")
    def my_objective(profile: Profile, options: ObjectiveOptions) -> ObjectiveTerms: ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import InputError
from ..profile import Profile


@dataclass(frozen=True)
class ObjectiveOptions:
    importance_alpha: float = 0.5  # a in I_e = a f_e + (1 - a) s_e
    expert_weight: float | None = None  # nats for dropping a whole layer's proxy mass; None = fit to prune_cost


@dataclass(frozen=True, eq=False)
class ObjectiveTerms:
    """Linear costs: ``drop[i][e]`` per MoE layer i, ``format_cost[b, f]`` over profile.sensitivity.formats
    (NaN where not applicable), ``topk[i][k-1]``."""

    name: str
    drop: tuple[np.ndarray, ...]
    format_cost: np.ndarray
    topk: tuple[np.ndarray, ...]
    description: str


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
    terms = get_objective(name)(profile, options or ObjectiveOptions())
    for i, d in enumerate(terms.drop):
        if not np.all(np.isfinite(d)) or np.any(d < 0):
            raise InputError(f"objective {name}: drop costs of MoE layer {i} must be finite and >= 0")
    return terms


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
