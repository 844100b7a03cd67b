"""Dense Llama -> Qwen2-MoE conversion pipeline (calibrate, split, fit routers, assemble).

Independent of where the dense model comes from: :func:`moefy` takes any transformers
Llama-style model object with SwiGLU FFNs (``model.model.layers[l].mlp.{gate,up,down}_proj``)
and calibration token windows; the SmolLM2 GGUF loading and evaluation live in ``cli.py``.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .convert import assemble, layer_state, moe_config
from .router import fit_router, routing_report, scale_router
from .split import FFNSplit, cluster_neurons, expert_outputs, expert_weights, neuron_contributions


@dataclass
class MoefySettings:
    """Conversion knobs (defaults: the R3 recipe)."""

    experts: int = 16
    shared_neurons: int = 256
    top_k: int = 12
    kmeans_iters: int = 25
    cluster_tokens: int = 8192  # calibration tokens used for the co-activation features
    ridge: float = 1e-3
    max_logit: float = 1e-4
    holdout_fraction: float = 0.125  # last part of the calibration tokens: router quality report only
    report_ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def capture_ffn_inputs(model: Any, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """FFN inputs (post-attention-norm hidden states) of every layer: list of [B*W, H] float32."""
    layers = model.model.layers
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_hook(
        lambda mod, inp, out, i=i: store[i].append(inp[0].reshape(-1, inp[0].shape[-1]).float().clone()))
        for i, layer in enumerate(layers)]
    try:
        for start in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[start:start + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s) for s in store]


def _ffn_weights(model: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mlp = model.model.layers[layer].mlp
    return (mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float(),
            mlp.down_proj.weight.detach().float())


@torch.no_grad()
def moefy_layer(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                s: MoefySettings) -> tuple[FFNSplit, dict[str, torch.Tensor], torch.Tensor, dict[str, Any]]:
    """Split one FFN and fit its router on FFN inputs ``x`` [T, H]; returns split, expert tensors, router, stats."""
    t = x.shape[0]
    n_hold = int(t * s.holdout_fraction) if t >= 16 else 0
    fit_x, hold_x = x[: t - n_hold], x[t - n_hold:]
    contrib = neuron_contributions(fit_x[: s.cluster_tokens], gate, up, down)
    split = cluster_neurons(contrib, s.experts, s.shared_neurons, iters=s.kmeans_iters, seed=s.seed)
    norms = torch.empty(fit_x.shape[0], s.experts)
    for start in range(0, fit_x.shape[0], 2048):
        routed, _ = expert_outputs(fit_x[start:start + 2048], gate, up, down, split)
        norms[start:start + 2048] = routed.norm(dim=-1)
    router = fit_router(fit_x, norms, ridge=s.ridge)
    router, factor = scale_router(router, fit_x, s.max_logit)
    stats: dict[str, Any] = {"router_scale": factor, "fit_tokens": int(fit_x.shape[0]),
                             "holdout_tokens": int(n_hold),
                             "expert_mean_norm": [round(float(v), 5) for v in norms.mean(0)]}
    if n_hold:
        routed, shared = expert_outputs(hold_x, gate, up, down, split)
        ks = [k for k in s.report_ks if k <= s.experts]
        rep = routing_report(routed, shared, hold_x, router, ks)
        stats["holdout_rel_sq_error"] = {name: {str(k): round(v, 5) for k, v in d.items()} for name, d in rep.items()}
        y = routed.sum(1) + shared
        stats["shared_share"] = round(float((shared ** 2).sum() / (y ** 2).sum()), 5)
    experts = expert_weights(gate, up, down, split, routed_scale=float(s.experts), shared_scale=2.0)
    return split, experts, router, stats


def moefy(dense: Any, calib_windows: torch.Tensor, s: MoefySettings,
          log: Callable[[str], None] = print) -> tuple[Any, dict[str, Any], list[FFNSplit]]:
    """Qwen2-MoE model from a dense Llama-style model; also per-layer stats and the neuron splits."""
    t0 = time.perf_counter()
    inputs = capture_ffn_inputs(dense, calib_windows)
    log(f"calibration forward: {calib_windows.numel()} tokens, {time.perf_counter() - t0:.1f} s")
    n_inter = dense.config.intermediate_size
    cfg = moe_config(dense.config, s.experts, s.top_k, (n_inter - s.shared_neurons) // s.experts,
                     s.shared_neurons)
    dense_state = {k: v.detach().float() for k, v in dense.state_dict().items()}
    layers, stats, splits = [], [], []
    t1 = time.perf_counter()
    for i, x in enumerate(inputs):
        split, experts, router, st = moefy_layer(x, *_ffn_weights(dense, i), s)
        layers.append(layer_state(f"model.layers.{i}.mlp", experts, router))
        stats.append(st)
        splits.append(split)
        err = st.get("holdout_rel_sq_error", {}).get("router", {})
        log(f"layer {i:2d}: shared share {st.get('shared_share', float('nan')):.3f}, held-out rel. sq. error "
            + ", ".join(f"k={k}: {v:.3f}" for k, v in err.items()))
        inputs[i] = None  # free
    log(f"split + routers: {time.perf_counter() - t1:.1f} s")
    model = assemble(cfg, dense_state, layers)
    return model, {"layers": stats, "seconds": time.perf_counter() - t0}, splits
