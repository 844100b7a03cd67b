"""Statistics gathered by hooks during the reference pass: routing statistics and input second moments.

**Routing.** A forward pre-hook on each MoE layer's ``experts`` module sees exactly what the router decided
(transformers 5 calls ``experts(hidden_states, top_k_index, top_k_weights)`` in every supported family), so
the statistics need no family-specific router code. Per expert e of a layer, over the N calibration tokens:

* ``frequency[e]`` = picks of e / (N * top_k) (a layer sums to 1);
* ``mean_score[e]`` = mean routing weight of e over the tokens that picked it (the weight the model
  multiplies the expert's output by: renormalised top-k probabilities, DeepSeek's scaled sigmoid scores);
* ``routing_mass[e]`` = summed routing weight of e, divided by the layer's total (a layer sums to 1);
* ``saliency[e]`` (REAP) = mean over the tokens routed to e of ``weight * ||expert_e(x)||_2``.

**Input second moments** (the importance matrix of llama.cpp). For every quantizable linear block, the
per-input-column mean of ``x_j^2`` over all N tokens. Routed experts see only their tokens, and their
output is scaled by the routing weight g, so their moments are ``sum over routed tokens of g^2 x_j^2 / N``
(gate/up: the layer input; down: ``act(gate x) * up x``). Embeddings: the token frequencies (a token's row
is "used" once per occurrence). The proxy of block W in format f is then

    proxy(W, f) = sum_j m_j * ||W[:, j] - Q_f(W)[:, j]||^2   (embeddings: sum_t p_t ||W[t] - Q_f(W)[t]||^2)

the expected squared error the block adds to its output per token. It is computed for every block and
candidate format while the block's layer is in memory.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from optimizer.model_spec import Architecture, BlockKind

from .blocks import BlockRef, quantized_copy


class LayerStats:
    """Routing statistics of one MoE layer, accumulated batch by batch."""

    def __init__(self, num_experts: int, top_k: int):
        self.top_k = top_k
        self.count = torch.zeros(num_experts, dtype=torch.float64)
        self.weight = torch.zeros(num_experts, dtype=torch.float64)
        self.salience = torch.zeros(num_experts, dtype=torch.float64)
        self.tokens = 0

    def frequency(self) -> np.ndarray:
        total = self.count.sum().item()
        return (self.count / total).numpy() if total > 0 else np.zeros(len(self.count))

    def mean_score(self) -> np.ndarray:
        return torch.where(self.count > 0, self.weight / self.count.clamp(min=1), 0.0).numpy()

    def routing_mass(self) -> np.ndarray:
        total = self.weight.sum().item()
        return (self.weight / total).numpy() if total > 0 else np.zeros(len(self.weight))

    def saliency(self) -> np.ndarray:
        return torch.where(self.count > 0, self.salience / self.count.clamp(min=1), 0.0).numpy()


def _squared_error(w: torch.Tensor, q: torch.Tensor, per_row: bool, chunk_bytes: int = 16 << 20) -> torch.Tensor:
    """``sum (w - q)^2`` of a 2-D block per column (``per_row=False``) or per row, float64.

    Computed a few MiB of rows at a time: an embedding of 49,152 x 576 float32 is 113 MiB, and whole-matrix
    float64 temporaries made this the peak memory of a streamed profile."""
    rows = max(1, chunk_bytes // (4 * max(w.shape[-1], 1)))
    parts = []
    for start in range(0, w.shape[0], rows):
        d2 = (w[start:start + rows].float() - q[start:start + rows].float()).pow_(2)
        parts.append(d2.sum(1, dtype=torch.float64) if per_row else d2.sum(0, dtype=torch.float64))
    return torch.cat(parts) if per_row else torch.stack(parts).sum(0)


def _expert_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs[n] for n in names[len(args):]]
    return vals[0], vals[1], vals[2]


class Collector:
    """Attaches the hooks of one decoder layer and computes its proxies when the layer is done."""

    def __init__(self, arch: Architecture, refs: Sequence[BlockRef], formats: Sequence[str], num_tokens: int,
                 method: str = "rtn", cache: dict | None = None):
        self.arch = arch
        self.cache = cache  # (block name, format) -> fake-quantized weight, reused by the measurements
        self.formats = list(formats)
        self.tokens = num_tokens
        self.method = method
        self.layer_stats: dict[int, LayerStats] = {m.index: LayerStats(m.num_experts, m.top_k) for m in arch.moe_layers}
        self.refs_by_step: dict[int, list[BlockRef]] = {}
        for r in refs:
            self.refs_by_step.setdefault(r.step, []).append(r)
        self.moments: dict[str, torch.Tensor] = {}  # block name -> second-moment vector (sums until finished)
        self.proxy: dict[str, dict[str, float]] = {}  # block name -> format -> proxy
        self.weight_sq: dict[str, dict[str, float]] = {}  # block name -> format -> ||W - Q(W)||^2 (unweighted)

    # ------------------------------------------------------------------------------------------- hooks
    def _linear_hook(self, key: str):
        def hook(_module, args, kwargs):
            x = args[0] if args else kwargs.get("input", kwargs.get("hidden_states"))
            x2 = x.detach().reshape(-1, x.shape[-1]).double().pow(2).sum(0)
            self.moments[key] = self.moments.get(key, 0) + x2
        return hook

    def _experts_hook(self, layer: int, refs: list[BlockRef]):
        stats = self.layer_stats[layer]
        by_expert: dict[int, list[BlockRef]] = {}
        for r in refs:
            by_expert.setdefault(r.expert, []).append(r)

        @torch.no_grad()
        def hook(module, args, kwargs):
            hs, idx, w = _expert_call(args, kwargs)
            hs = hs.detach().reshape(-1, hs.shape[-1])
            w = w.detach().to(torch.float64)
            stats.tokens += hs.shape[0]
            flat = idx.reshape(-1)
            stats.count += torch.bincount(flat, minlength=len(stats.count)).double()[: len(stats.count)]
            stats.weight.index_add_(0, flat, w.reshape(-1))
            inter = module.down_proj.shape[-1]
            for e in torch.unique(flat).tolist():
                tok, slot = torch.where(idx == e)
                x = hs[tok]
                g = w[tok, slot]
                gate_up = nn.functional.linear(x, module.gate_up_proj[e])
                act = module.act_fn(gate_up[:, :inter]) * gate_up[:, inter:]
                y = nn.functional.linear(act, module.down_proj[e])
                stats.salience[e] += (g * y.double().norm(dim=-1)).sum()
                g2 = (g * g).unsqueeze(-1)
                for r in by_expert.get(e, []):
                    inp = act if r.block.projection == "down_proj" else x
                    self.moments[r.name] = self.moments.get(r.name, 0) + (g2 * inp.double().pow(2)).sum(0)
        return hook

    def attach(self, model: nn.Module, step: int) -> list:
        """Register this step's hooks on ``model``; returns the handles."""
        handles = []
        refs = self.refs_by_step.get(step, [])
        expert_refs = [r for r in refs if r.block.is_routed_expert]
        if step in self.layer_stats:
            from runtime.moe import get_layer

            h = get_layer(model, step)
            handles.append(h.experts.register_forward_pre_hook(self._experts_hook(step, expert_refs), with_kwargs=True))
        for r in refs:
            if r.block.is_routed_expert or r.block.kind == BlockKind.EMBEDDING:
                continue
            mod = model.get_submodule(r.module)
            handles.append(mod.register_forward_pre_hook(self._linear_hook(r.name), with_kwargs=True))
        return handles

    def embedding_moments(self, input_ids: torch.Tensor, vocab: int) -> None:
        for r in self.refs_by_step.get(-1, []):
            self.moments[r.name] = torch.bincount(input_ids.reshape(-1), minlength=vocab).double()[:vocab]

    # ---------------------------------------------------------------------------------------- proxies
    @torch.no_grad()
    def finish(self, model: nn.Module, step: int) -> None:
        """Proxy of every block of ``step`` in every admissible candidate format (weights must be present)."""
        from optimizer.formats import get_format

        for r in self.refs_by_step.get(step, []):
            w = r.tensor(model).detach()
            m = self.moments.get(r.name)
            m = torch.zeros(w.shape[0] if r.block.kind == BlockKind.EMBEDDING else w.shape[-1], dtype=torch.float64) \
                if m is None else m / max(self.tokens, 1)
            self.moments[r.name] = m
            self.proxy[r.name], self.weight_sq[r.name] = {}, {}
            for f in self.formats:
                if not get_format(f).admits(r.block.shape):
                    continue
                q = quantized_copy(w, f, self.method)
                if self.cache is not None:
                    self.cache[(r.name, f)] = q
                col = _squared_error(w, q, per_row=r.block.kind == BlockKind.EMBEDDING)
                del q
                self.proxy[r.name][f] = float((col * m).sum())
                self.weight_sq[r.name][f] = float(col.sum())
