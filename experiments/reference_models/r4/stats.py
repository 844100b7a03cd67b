"""Routing statistics of a top-k softmax router, from its logits.

For logits ``z`` [T, E] and ``p = softmax(z)``:

* entropy ``H_t = -sum_e p_te log p_te`` (nats), reported as its mean over tokens and as a fraction of
  ``log E`` (1 = uniform, R3's near-tied routers; 0 = one expert takes all);
* top-k mass ``sum_{e in top-k} p_te`` (the softmax mass the chosen experts hold before
  ``norm_topk_prob`` renormalises them; ``k / E`` when uniform) and the renormalised top-1 weight;
* load ``f_e = #{t : e in top-k(t)} / T``, the fraction of tokens routed to expert ``e``
  (``sum_e f_e = k``, mean ``k / E``), reported as ``max f / mean f`` (1 = balanced, ``E / k`` = the
  same k experts for every token), ``min f / mean f`` and the number of experts no token chose.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def routing_stats(logits: torch.Tensor, k: int) -> dict[str, Any]:
    """Statistics of one layer's router logits [T, E] at top-``k`` (see the module docstring)."""
    t, e = logits.shape
    logp = torch.log_softmax(logits.double(), dim=-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    top = p.topk(k, dim=-1)
    load = torch.bincount(top.indices.reshape(-1), minlength=e).double() / t
    mean = k / e
    return {"tokens": t, "experts": e, "top_k": k,
            "entropy": float(entropy.mean()), "entropy_over_log_e": float(entropy.mean()) / math.log(e),
            "topk_mass": float(top.values.sum(-1).mean()),
            "top1_weight": float((top.values[:, 0] / top.values.sum(-1)).mean()),
            "load": [round(float(v), 5) for v in load],
            "max_over_mean_load": float(load.max()) / mean, "min_over_mean_load": float(load.min()) / mean,
            "unused_experts": int((load == 0).sum())}


def summarize(per_layer: list[dict[str, Any]]) -> dict[str, float]:
    """Means / extremes of :func:`routing_stats` over layers."""
    def col(name: str) -> list[float]:
        return [float(s[name]) for s in per_layer]

    n = len(per_layer)
    return {"layers": n, "entropy_mean": sum(col("entropy")) / n,
            "entropy_over_log_e_mean": sum(col("entropy_over_log_e")) / n,
            "entropy_over_log_e_min": min(col("entropy_over_log_e")),
            "entropy_over_log_e_max": max(col("entropy_over_log_e")),
            "topk_mass_mean": sum(col("topk_mass")) / n, "top1_weight_mean": sum(col("top1_weight")) / n,
            "max_over_mean_load_mean": sum(col("max_over_mean_load")) / n,
            "max_over_mean_load_max": max(col("max_over_mean_load")),
            "unused_experts_total": int(sum(col("unused_experts")))}


class RouterLogitRecorder:
    """Context manager: records every ``layer.mlp.gate`` (Qwen2-MoE router) logit tensor of ``model``."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.logits: list[list[torch.Tensor]] = []
        self._hooks: list[Any] = []

    def __enter__(self) -> "RouterLogitRecorder":
        layers = self.model.model.layers
        self.logits = [[] for _ in layers]
        for i, layer in enumerate(layers):
            self._hooks.append(layer.mlp.gate.register_forward_hook(
                lambda mod, inp, out, i=i: self._record(i, out[0])))
        return self

    def _record(self, layer: int, logits: torch.Tensor) -> None:
        self.logits[layer].append(logits.detach().float().reshape(-1, logits.shape[-1]))

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def stats(self, k: int) -> list[dict[str, Any]]:
        return [routing_stats(torch.cat(chunks), k) for chunks in self.logits]
