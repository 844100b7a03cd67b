"""Per-layer expert load of an MoE model on a corpus split.

Works for every family whose router module is ``*.mlp.gate`` returning a tuple
whose last element is the ``[tokens, top_k]`` expert-index tensor (DeepSeek-V3,
Qwen2/3-MoE, Mixtral, OLMoE in transformers 5.x).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class LayerLoad:
    """Fraction of routed (token, slot) pairs that went to each expert of one layer."""

    layer: str
    fractions: tuple[float, ...]

    @property
    def max_over_mean(self) -> float:
        """Largest load divided by the uniform load (1.0 = perfectly balanced)."""
        return max(self.fractions) * len(self.fractions)

    @property
    def min_over_mean(self) -> float:
        """Smallest load divided by the uniform load."""
        return min(self.fractions) * len(self.fractions)

    @property
    def normalized_entropy(self) -> float:
        """Entropy of the load distribution divided by log(experts), in [0, 1]."""
        p = torch.tensor(self.fractions).clamp_min(1e-12)
        return float(-(p * p.log()).sum() / torch.log(torch.tensor(float(len(self.fractions)))))


@torch.no_grad()
def expert_load(model: Any, ids: list[int] | torch.Tensor, window: int = 256,
                max_tokens: int = 65_536, batch_size: int = 8) -> list[LayerLoad]:
    """Run ``model`` over non-overlapping windows of ``ids`` and count expert picks per layer."""
    gates = [(n, m) for n, m in model.named_modules() if n.endswith("mlp.gate")]
    counts: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(_module, _inp, out):
            idx = out[-1] if isinstance(out, tuple) else None
            if idx is None or idx.dtype not in (torch.int64, torch.int32):
                return
            n = int(idx.max().item()) + 1
            c = torch.bincount(idx.flatten(), minlength=n)
            prev = counts.get(name)
            if prev is not None and prev.numel() < c.numel():
                prev = torch.nn.functional.pad(prev, (0, c.numel() - prev.numel()))
            if prev is not None and c.numel() < prev.numel():
                c = torch.nn.functional.pad(c, (0, prev.numel() - c.numel()))
            counts[name] = c if prev is None else prev + c
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in gates]
    try:
        data = torch.as_tensor(ids, dtype=torch.long)
        n_windows = max(1, min(len(data) // window, max_tokens // window))
        x = data[: n_windows * window].view(n_windows, -1)
        model.eval()
        for i in range(0, n_windows, batch_size):
            model(input_ids=x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, module in gates:
        c = counts.get(name)
        if c is None:
            continue
        n_exp = getattr(module, "num_experts", None) or getattr(module, "n_routed_experts", None) or c.numel()
        if c.numel() < n_exp:
            c = torch.nn.functional.pad(c, (0, n_exp - c.numel()))
        frac = (c.double() / c.sum()).tolist()
        out.append(LayerLoad(name.removesuffix(".mlp.gate"), tuple(frac)))
    return out


def load_table(loads: list[LayerLoad]) -> str:
    """Markdown table: one row per MoE layer."""
    rows = ["| layer | experts | max/mean | min/mean | norm. entropy |", "|---|---|---|---|---|"]
    for ld in loads:
        rows.append(f"| {ld.layer} | {len(ld.fractions)} | {ld.max_over_mean:.2f} | "
                    f"{ld.min_over_mean:.2f} | {ld.normalized_entropy:.3f} |")
    return "\n".join(rows)


def model_expert_load(model_dir: str | Path, corpus: str = "english", split: str = "test",
                      window: int = 256, max_tokens: int = 65_536) -> list[LayerLoad]:
    """Convenience: load a byte-level model directory and measure its expert load."""
    from .corpora import load_corpus_bytes
    from .evaluate import load_model

    return expert_load(load_model(model_dir), list(load_corpus_bytes(corpus, split)), window, max_tokens)
