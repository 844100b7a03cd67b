"""Layer-local distillation of one Qwen2-MoE block onto the dense FFN it came from.

For FFN inputs ``X`` [T, H] and the dense FFN outputs ``Y = FFN(X)`` captured on calibration text,
the MoE block (router ``W`` [E, H], experts ``(G_e, U_e, D_e)``, shared expert ``(G_s, U_s, D_s)`` with
its sigmoid gate ``g_s``) computes, exactly as ``Qwen2MoeSparseMoeBlock`` with ``norm_topk_prob=True``,

    p = softmax(X W^T),  K = top-k(p),  w_e = p_e / sum_{j in K} p_j  (e in K, else 0)
    MoE(x) = sigmoid(g_s . x) D_s (silu(G_s x) * U_s x) + sum_{e in K} w_e D_e (silu(G_e x) * U_e x)

and Adam minimises the relative squared error ``||MoE(X) - Y||^2 / ||Y||^2`` over minibatches of
calibration tokens, with the real top-k selection and gradients through the routing weights ``w``
(the selection itself has no gradient), plus optionally the Switch-Transformer balance term
``alpha * E * sum_e f_e P_e`` (``f_e``: fraction of the top-k slots given to expert e, ``P_e``: mean
router probability).  The routed experts are evaluated densely as one SwiGLU over all ``E*r`` neurons
whose intermediate activations are multiplied by their expert's (mostly zero) weight, so a step is
three matmuls, as fast as the dense FFN.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class DistillSettings:
    """Adam knobs of the per-layer distillation."""

    top_k: int = 8
    steps: int = 150
    batch_tokens: int = 1024
    lr_router: float = 3e-3
    lr_experts: float = 3e-4
    balance_alpha: float = 0.01
    train_experts: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MoEBlock(nn.Module):
    """Trainable Qwen2-MoE block in R3's tensor layout (``r3.split.expert_weights`` + router + shared gate)."""

    def __init__(self, experts: dict[str, torch.Tensor], router: torch.Tensor, top_k: int,
                 shared_gate: torch.Tensor | None = None) -> None:
        super().__init__()
        num_e, two_r, hidden = experts["gate_up_proj"].shape
        self.num_experts, self.expert_size, self.top_k = num_e, two_r // 2, top_k
        self.router = nn.Parameter(router.detach().clone().float())
        self.gate_up = nn.Parameter(experts["gate_up_proj"].detach().clone().float())
        self.down = nn.Parameter(experts["down_proj"].detach().clone().float())
        self.shared_gate_proj = nn.Parameter(experts["shared_gate_proj"].detach().clone().float())
        self.shared_up_proj = nn.Parameter(experts["shared_up_proj"].detach().clone().float())
        self.shared_down_proj = nn.Parameter(experts["shared_down_proj"].detach().clone().float())
        sg = torch.zeros(1, hidden) if shared_gate is None else shared_gate.detach().clone().float()
        self.shared_expert_gate = nn.Parameter(sg)

    def routing(self, x: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits [T, E], dense combine weights [T, E] (zero off the top-k, renormalised), top-k indices)."""
        k = self.top_k if top_k is None else top_k
        logits = x @ self.router.T
        probs = torch.softmax(logits, dim=-1)
        top_v, top_i = probs.topk(k, dim=-1)
        top_v = top_v / top_v.sum(-1, keepdim=True)
        weights = torch.zeros_like(probs).scatter(1, top_i, top_v)
        return logits, weights, top_i

    def forward(self, x: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(output [T, H], router logits [T, E], top-k indices [T, k])."""
        e, r = self.num_experts, self.expert_size
        logits, weights, top_i = self.routing(x, top_k)
        gu = self.gate_up.view(e, 2, r, -1)
        g = x @ gu[:, 0].reshape(e * r, -1).T
        u = x @ gu[:, 1].reshape(e * r, -1).T
        h = (F.silu(g) * u).view(-1, e, r) * weights[..., None]
        routed = h.reshape(-1, e * r) @ self.down.permute(1, 0, 2).reshape(self.down.shape[1], e * r).T
        shared = (F.silu(x @ self.shared_gate_proj.T) * (x @ self.shared_up_proj.T)) @ self.shared_down_proj.T
        shared = torch.sigmoid(x @ self.shared_expert_gate.T) * shared
        return routed + shared, logits, top_i

    def tensors(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(expert tensors for ``r3.convert.layer_state``, router [E, H], shared expert gate [1, H])."""
        experts = {"gate_up_proj": self.gate_up, "down_proj": self.down, "shared_gate_proj": self.shared_gate_proj,
                   "shared_up_proj": self.shared_up_proj, "shared_down_proj": self.shared_down_proj}
        return ({k: v.detach().clone().contiguous() for k, v in experts.items()},
                self.router.detach().clone().contiguous(), self.shared_expert_gate.detach().clone().contiguous())


def balance_loss(logits: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing term ``E * sum_e f_e P_e`` (1 when perfectly balanced)."""
    e = logits.shape[-1]
    f = torch.zeros(e).index_add_(0, top_i.reshape(-1), torch.ones(top_i.numel())) / top_i.numel()
    return e * (f * torch.softmax(logits, dim=-1).mean(0)).sum()


@torch.no_grad()
def relative_error(block: MoEBlock, x: torch.Tensor, y: torch.Tensor, top_k: int | None = None,
                   chunk: int = 4096) -> float:
    """``||block(x) - y||^2 / ||y||^2`` (at ``top_k``, default the block's)."""
    num = den = 0.0
    for s in range(0, x.shape[0], chunk):
        out = block(x[s:s + chunk], top_k)[0]
        num += float(((out - y[s:s + chunk]) ** 2).sum())
        den += float((y[s:s + chunk] ** 2).sum())
    return num / max(den, 1e-30)


def distill(block: MoEBlock, x: torch.Tensor, y: torch.Tensor, s: DistillSettings) -> dict[str, Any]:
    """Adam on ``block`` to fit ``y`` from ``x`` (both [T, H]); deterministic given ``s.seed``. Returns a log."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(s.seed)
    expert_params = [p for n, p in block.named_parameters() if n != "router"]
    groups = [{"params": [block.router], "lr": s.lr_router}]
    if s.train_experts:
        groups.append({"params": expert_params, "lr": s.lr_experts})
    else:
        for p in expert_params:
            p.requires_grad_(False)
    opt = torch.optim.Adam(groups, betas=(0.9, 0.99))
    base = [g["lr"] for g in opt.param_groups]
    warm = max(1, s.steps // 20)
    y_scale = float((y ** 2).sum(-1).mean())
    first = last = math.nan
    for step in range(s.steps):
        if step < warm:
            mult = (step + 1) / warm
        else:
            mult = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, s.steps - warm)))
        for g, lr in zip(opt.param_groups, base):
            g["lr"] = lr * mult
        idx = torch.randint(x.shape[0], (min(s.batch_tokens, x.shape[0]),), generator=gen)
        out, logits, top_i = block(x[idx])
        mse = ((out - y[idx]) ** 2).sum(-1).mean() / y_scale
        loss = mse + s.balance_alpha * balance_loss(logits, top_i) if s.balance_alpha else mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        first = float(mse.detach()) if step == 0 else first
        last = float(mse.detach())
    for p in block.parameters():
        p.requires_grad_(True)
    return {"steps": s.steps, "first_batch_rel_error": round(first, 5), "last_batch_rel_error": round(last, 5),
            "seconds": round(time.perf_counter() - t0, 1)}
