"""Turning an unscaled proxy (importance-matrix error, plain weight error) into nats per token.

The proxy of a block is proportional to the squared error it adds to its own output; how much of that
reaches the loss depends on where the block sits. So the scale is fitted per *group* (block kind and
projection, e.g. ``routed_expert.down_proj``, ``attention.q_proj``) against the measured loss increases:

    log c_g = median over measured pairs (b, f) of the group of [log measured(b, f) - log proxy(b, f)]

using only pairs where both are > 0 (a quantization whose measured loss increase is <= 0 carries no
scale information). A group with fewer than ``MIN_PAIRS`` usable pairs uses the scale fitted on all
groups together; with no usable pair at all the scale is 0 (flagged in the fit report). The median of log
ratios makes the fit robust to the noise of tiny measured differences, and it scales every format of a
group by the same factor, so the proxy's ranking of formats is kept.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MIN_PAIRS = 3


@dataclass
class ProxyFit:
    scales: dict[str, float]  # group -> nats per proxy unit
    global_scale: float
    pairs: dict[str, int]  # group -> usable pairs
    fallback: list[str] = field(default_factory=list)  # groups using the global scale

    def scale(self, group: str) -> float:
        return self.scales.get(group, self.global_scale)

    def to_json(self) -> dict:
        return {"scales": self.scales, "global_scale": self.global_scale, "pairs": self.pairs,
                "fallback_groups": self.fallback, "rule": "median log ratio per group, pairs with both > 0"}


def fit_proxy(proxy: dict[str, dict[str, float]], measured: dict[str, dict[str, float]],
              group_of: dict[str, str]) -> ProxyFit:
    """``proxy[block][format]`` and ``measured[block][format]`` (nats) -> per-group scales."""
    logs: dict[str, list[float]] = {}
    for name, row in measured.items():
        for f, m in row.items():
            p = proxy.get(name, {}).get(f)
            if p is not None and p > 0 and m is not None and m > 0 and math.isfinite(m):
                logs.setdefault(group_of[name], []).append(math.log(m) - math.log(p))
    everything = [v for vals in logs.values() for v in vals]
    global_scale = float(math.exp(np.median(everything))) if everything else 0.0
    scales, fallback = {}, []
    for g in sorted(set(group_of.values())):
        vals = logs.get(g, [])
        if len(vals) >= MIN_PAIRS:
            scales[g] = float(math.exp(np.median(vals)))
        else:
            scales[g] = global_scale
            fallback.append(g)
    return ProxyFit(scales, global_scale, {g: len(logs.get(g, [])) for g in sorted(set(group_of.values()))}, fallback)


def apply_fit(proxy: dict[str, dict[str, float]], fit: ProxyFit, group_of: dict[str, str]) -> dict[str, dict[str, float]]:
    return {name: {f: v * fit.scale(group_of[name]) for f, v in row.items()} for name, row in proxy.items()}
