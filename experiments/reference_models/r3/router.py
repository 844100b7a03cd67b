"""Per-layer linear routers fitted on calibration text.

Target: for each calibration token, the output norm ``||y_e(x)||`` of every routed expert
(MoEfication's choice: an expert worth computing is one whose output is large).  The router
``W`` [E, H] solves the ridge least-squares problem ``min ||X W^T - A||^2 + lam ||W||^2``
in closed form (float64 normal equations); no bias, as Qwen2-MoE routers have none (a probe
with an intercept column ranked experts no better).  Probes with ``log`` norms or with a
softmax cross-entropy against normalised squared norms (Adam, 300 epochs) chose experts of
the same quality (within 0.005 relative squared error), so the closed form is kept.

Only the ranking of ``W x`` matters for top-k selection.  The saved router is ``W`` times a
per-layer factor that makes ``max |logit|`` on the calibration tokens ``max_logit`` (1e-4):
the softmax is then uniform to within ~2e-4, so with the experts' down projections scaled
by E each selected expert is weighted 1 +- 2e-4 (see ``build.py``), for every top-k.
"""
from __future__ import annotations

import torch


def fit_router(x: torch.Tensor, targets: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Ridge least squares ``W`` [E, H] with ``x W^T ~ targets`` ([T, H], [T, E]); ``ridge`` is relative to trace/H."""
    xd = x.double()
    gram = xd.T @ xd
    lam = ridge * float(gram.diagonal().mean())
    gram += lam * torch.eye(gram.shape[0], dtype=gram.dtype)
    w = torch.linalg.solve(gram, xd.T @ targets.double())
    return w.T.float().contiguous()


def scale_router(weight: torch.Tensor, x: torch.Tensor, max_logit: float = 1e-4) -> tuple[torch.Tensor, float]:
    """``weight`` scaled so that ``max |x weight^T| == max_logit`` on ``x``; returns it and the factor."""
    peak = float((x @ weight.T).abs().max())
    factor = max_logit / peak if peak > 0 else 1.0
    return (weight * factor).contiguous(), factor


def selection_error(routed: torch.Tensor, shared: torch.Tensor, scores: torch.Tensor, k: int) -> float:
    """Relative squared error ``||y - shared - sum_{top-k by scores} y_e||^2 / ||y||^2`` over all tokens."""
    y = routed.sum(1) + shared
    idx = scores.topk(k, dim=1).indices
    kept = torch.gather(routed, 1, idx[..., None].expand(-1, -1, routed.shape[-1])).sum(1) + shared
    return float(((y - kept) ** 2).sum() / (y ** 2).sum().clamp_min(1e-30))


def routing_report(routed: torch.Tensor, shared: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                   ks: list[int]) -> dict[str, dict[int, float]]:
    """Held-out selection errors of the fitted router vs the oracle (top-k by true output norm)."""
    norms = routed.norm(dim=-1)
    logits = x @ weight.T
    out: dict[str, dict[int, float]] = {"router": {}, "oracle": {}}
    for k in ks:
        out["router"][k] = selection_error(routed, shared, logits, k)
        out["oracle"][k] = selection_error(routed, shared, norms, k)
    return out
