"""Turning an unscaled proxy (importance-matrix error, plain weight error) into nats per token.

The proxy of a block is proportional to the squared error it adds to its own output; how much of that
reaches the loss depends on where the block sits and, on some models, not linearly. So the scale is fitted
per *group* (block kind and projection, e.g. ``routed_expert.down_proj``, ``attention.q_proj``) and per
*format* against the measured loss increases:

    log c_{g,f} = median over measured blocks b of group g of [log measured(b, f) - log proxy(b, f)]
    log c_g     = the same median over all formats of the group (used where (g, f) has < MIN_PAIRS pairs)

using only pairs where both are > 0 (a quantization whose measured loss increase is <= 0 carries no
scale information). A group with fewer than ``MIN_PAIRS`` usable pairs uses the scale fitted on all groups
together; with no usable pair at all the scale is 0 (flagged in the fit report). The median of log ratios
makes the fit robust to the noise of tiny measured differences. Within a (group, format) the proxy's ranking
of blocks is kept.

Why per format: the proxy grows ~4x per bit removed (squared error), and on R1 and R2 the measured KL does
too, but on R3 (near-uniform routers: tiny perturbations flip near-tied top-k choices) the measured KL of a
block grows only ~5-10x from BF16 to int2 while the proxy grows ~10^5x. One scale per group then
over-predicted int2 ~10x and under-predicted BF16 ~100x; summed over random mixed plans the predictions were
36x too high and ranked them at Spearman 0.871. Per (group, format) scales: 10x and 0.901; R1 and R2 are
unchanged (0.985 / 0.985).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MIN_PAIRS = 3


@dataclass
class ProxyFit:
    scales: dict[str, float]  # group -> nats per proxy unit (all formats together)
    global_scale: float
    pairs: dict[str, int]  # group -> usable pairs
    fallback: list[str] = field(default_factory=list)  # groups using the global scale
    format_scales: dict[str, dict[str, float]] = field(default_factory=dict)  # group -> format -> scale

    def scale(self, group: str, fmt: str | None = None) -> float:
        """Scale of ``(group, fmt)``; the group's own scale where the format had too few pairs."""
        if fmt is not None and fmt in self.format_scales.get(group, {}):
            return self.format_scales[group][fmt]
        return self.scales.get(group, self.global_scale)

    def to_json(self) -> dict:
        rule = (f"median log ratio per (group, format) with >= {MIN_PAIRS} pairs, else per group"
                if self.format_scales else "median log ratio per group")
        return {"scales": self.scales, "global_scale": self.global_scale, "pairs": self.pairs,
                "format_scales": self.format_scales, "fallback_groups": self.fallback,
                "rule": rule + "; pairs with both > 0"}


def _median_scale(logs: list[float]) -> float:
    return float(math.exp(np.median(logs)))


#: Fit rules: ``group_format`` (default) or ``group`` (one scale per group: keeps the proxy's own ratios
#: between formats, which add up over a plan even where single-block measurements do not).
RULES = ("group_format", "group")


def fit_proxy(proxy: dict[str, dict[str, float]], measured: dict[str, dict[str, float]],
              group_of: dict[str, str], rule: str = "group_format") -> ProxyFit:
    """``proxy[block][format]`` and ``measured[block][format]`` (nats) -> per-(group, format) scales."""
    if rule not in RULES:
        raise ValueError(f"unknown fit rule {rule!r}; choose one of {', '.join(RULES)}")
    logs: dict[str, list[float]] = {}
    by_format: dict[tuple[str, str], list[float]] = {}
    for name, row in measured.items():
        for f, m in row.items():
            p = proxy.get(name, {}).get(f)
            if p is not None and p > 0 and m is not None and m > 0 and math.isfinite(m):
                r = math.log(m) - math.log(p)
                logs.setdefault(group_of[name], []).append(r)
                by_format.setdefault((group_of[name], f), []).append(r)
    everything = [v for vals in logs.values() for v in vals]
    global_scale = _median_scale(everything) if everything else 0.0
    scales, fallback = {}, []
    groups = sorted(set(group_of.values()))
    for g in groups:
        vals = logs.get(g, [])
        if len(vals) >= MIN_PAIRS:
            scales[g] = _median_scale(vals)
        else:
            scales[g] = global_scale
            fallback.append(g)
    format_scales: dict[str, dict[str, float]] = {}
    for (g, f), vals in sorted(by_format.items()):
        if rule == "group_format" and len(vals) >= MIN_PAIRS:
            format_scales.setdefault(g, {})[f] = _median_scale(vals)
    return ProxyFit(scales, global_scale, {g: len(logs.get(g, [])) for g in groups}, fallback, format_scales)


def apply_fit(proxy: dict[str, dict[str, float]], fit: ProxyFit,
              group_of: dict[str, str]) -> dict[str, dict[str, float]]:
    return {name: {f: v * fit.scale(group_of[name], f) for f, v in row.items()} for name, row in proxy.items()}


#: Where the sensitivity method text starts describing the proxy cells (``refit`` replaces from here on).
PROXY_SENTENCE_START = "; the other blocks hold"


def proxy_sentence(fit: ProxyFit, details_name: str, proxy_only: bool = False) -> str:
    """The part of ``sensitivity.measurement.method`` that says how unmeasured cells were filled."""
    groups = ", ".join(f"{g} x{c:.3g}" for g, c in sorted(fit.scales.items()))
    per = ("(kind/projection group, format)" if fit.format_scales else "kind/projection group")
    who = PROXY_SENTENCE_START + (" (and, after refit --proxy-only, the measured ones too)" if proxy_only else "")
    return (f"{who} the importance-matrix proxy sum_j E[x_j^2] "
            f"||W[:,j]-Q(W)[:,j]||^2 (routed experts: inputs weighted by squared routing weight) scaled into nats "
            f"per {per} by the median log ratio to the measured values (profiling.fit; group scales {groups}"
            f"{'; per-format scales in the details file' if fit.format_scales else ''}). Raw proxy and measured "
            f"tables: {details_name}")
