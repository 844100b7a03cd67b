"""profiling.stats against statistics computed by hand on tiny made-up tensors (arithmetic in the comments).

The experts hook sees ``experts(hidden_states, top_k_index, top_k_weights)``; here a fake fused-experts module
with hidden size 2 and intermediate size 1 makes every expert output easy to compute by hand:
``gate_up_proj[e] = [[1, 0], [0, 1]]`` (gate = x0, up = x1), ``act_fn(t) = t * t`` and
``down_proj[e] = [[c_e], [0]]``, so ``act = x0^2 * x1`` and ``||expert_e(x)|| = c_e * |act|``, ``c = (1, 2, 3, 4)``.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from optimizer.model_spec import Block, BlockKind
from optimizer.synthetic import synthetic_architecture
from profiling import stats
from profiling.blocks import BlockRef
from profiling.stats import Collector, LayerStats, _squared_error

LAYER = 1  # synthetic_architecture(first_dense=1): layer 1 is the MoE layer, 4 experts, top-2


class FakeExperts(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        eye = torch.eye(2, dtype=torch.float64)
        self.gate_up_proj = nn.Parameter(eye.repeat(4, 1, 1))  # [E=4, 2I=2, H=2]
        c = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
        down = torch.zeros(4, 2, 1, dtype=torch.float64)
        down[:, 0, 0] = c
        self.down_proj = nn.Parameter(down)  # [E, H=2, I=1]

    @staticmethod
    def act_fn(t: torch.Tensor) -> torch.Tensor:
        return t * t


def _collector(num_tokens: int, refs=()) -> Collector:
    arch = synthetic_architecture(num_layers=2, num_experts=4, top_k=2, hidden=32, expert_inter=32, dense_inter=32,
                                  vocab=32)
    return Collector(arch, list(refs), ["BF16"], num_tokens)


def _expert_refs() -> list:
    return [SimpleNamespace(expert=e, name=f"e{e}.{p}", block=SimpleNamespace(projection=p))
            for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]


def _run_routing() -> Collector:
    """Three tokens in two calls (positional, then keyword arguments).

    token  x       act=x0^2*x1  experts  weights
    t0     [1, 2]  2            0, 1     0.8, 0.2
    t1     [3, 1]  9            1, 2     0.6, 0.4
    t2     [2, 2]  8            0, 1     0.7, 0.3     (expert 3 is never picked)
    """
    col = _collector(3)
    hook = col._experts_hook(LAYER, _expert_refs())
    module = FakeExperts()
    x = torch.tensor([[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    idx = torch.tensor([[0, 1], [1, 2], [0, 1]])
    w = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.7, 0.3]], dtype=torch.float64)
    hook(module, (x[None, :2], idx[:2], w[:2]), {})  # a [batch, seq, hidden] input is flattened
    hook(module, (), {"hidden_states": x[2:], "top_k_index": idx[2:], "top_k_weights": w[2:]})
    return col


def test_routing_statistics_by_hand() -> None:
    s = _run_routing().layer_stats[LAYER]
    assert s.tokens == 3
    # picks: e0 {t0, t2} = 2, e1 {t0, t1, t2} = 3, e2 {t1} = 1, e3 none; 6 = N * top_k slots
    assert s.count.tolist() == [2.0, 3.0, 1.0, 0.0]
    np.testing.assert_allclose(s.frequency(), [2 / 6, 3 / 6, 1 / 6, 0.0], rtol=1e-12)
    # summed weights: e0 0.8 + 0.7 = 1.5, e1 0.2 + 0.6 + 0.3 = 1.1, e2 0.4; total 3.0
    np.testing.assert_allclose(s.weight.numpy(), [1.5, 1.1, 0.4, 0.0], rtol=1e-12)
    # mean score = mean weight over the tokens that picked e: 1.5 / 2, 1.1 / 3, 0.4 / 1, 0 (never picked)
    np.testing.assert_allclose(s.mean_score(), [0.75, 1.1 / 3, 0.4, 0.0], rtol=1e-12)
    # routing mass = summed weight / 3.0
    np.testing.assert_allclose(s.routing_mass(), [1.5 / 3, 1.1 / 3, 0.4 / 3, 0.0], rtol=1e-12)
    # REAP: sum over routed tokens of weight * ||y|| = weight * c_e * act, then the mean over those tokens
    #   e0 (c=1): 0.8 * 1 * 2 + 0.7 * 1 * 8 = 1.6 + 5.6 = 7.2                -> / 2 = 3.6
    #   e1 (c=2): 0.2 * 2 * 2 + 0.6 * 2 * 9 + 0.3 * 2 * 8 = 0.8 + 10.8 + 4.8 = 16.4 -> / 3
    #   e2 (c=3): 0.4 * 3 * 9 = 10.8                                          -> / 1
    np.testing.assert_allclose(s.salience.numpy(), [7.2, 16.4, 10.8, 0.0], rtol=1e-12)
    np.testing.assert_allclose(s.saliency(), [3.6, 16.4 / 3, 10.8, 0.0], rtol=1e-12)


def test_routed_expert_moments_by_hand() -> None:
    """Routed experts' second moments: sum over their tokens of g^2 * inp^2 (before the division by N)."""
    m = _run_routing().moments
    # gate/up see x:  e0: 0.64 * [1, 4] + 0.49 * [4, 4] = [0.64 + 1.96, 2.56 + 1.96] = [2.6, 4.52]
    #                 e1: 0.04 * [1, 4] + 0.36 * [9, 1] + 0.09 * [4, 4] = [3.64, 0.88]
    #                 e2: 0.16 * [9, 1] = [1.44, 0.16]
    for p in ("gate_proj", "up_proj"):
        np.testing.assert_allclose(m[f"e0.{p}"].numpy(), [2.6, 4.52], rtol=1e-12)
        np.testing.assert_allclose(m[f"e1.{p}"].numpy(), [3.64, 0.88], rtol=1e-12)
        np.testing.assert_allclose(m[f"e2.{p}"].numpy(), [1.44, 0.16], rtol=1e-12)
    # down sees act = x0^2 * x1:  e0: 0.64 * 2^2 + 0.49 * 8^2 = 2.56 + 31.36 = 33.92
    #                             e1: 0.04 * 4 + 0.36 * 81 + 0.09 * 64 = 0.16 + 29.16 + 5.76 = 35.08
    #                             e2: 0.16 * 81 = 12.96
    np.testing.assert_allclose(m["e0.down_proj"].numpy(), [33.92], rtol=1e-12)
    np.testing.assert_allclose(m["e1.down_proj"].numpy(), [35.08], rtol=1e-12)
    np.testing.assert_allclose(m["e2.down_proj"].numpy(), [12.96], rtol=1e-12)
    assert not any(k.startswith("e3.") for k in m)  # never routed: no moment yet


def test_empty_layer_statistics_are_zero() -> None:
    s = LayerStats(3, 2)
    for v in (s.frequency(), s.mean_score(), s.routing_mass(), s.saliency()):
        assert v.tolist() == [0.0, 0.0, 0.0]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=False)
        self.other = nn.Linear(2, 2, bias=False)
        self.emb = nn.Embedding(6, 2)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[0.25, 1.5], [2.0, -0.75]]))
            self.other.weight.copy_(torch.tensor([[0.25, 1.5], [2.0, -0.75]]))
            self.emb.weight.copy_(torch.tensor([[0.25, 0.0], [0.5, 0.5], [1.0, 0.75], [0.0, 0.0], [3.0, 3.0],
                                                [-0.25, 1.0]]))


def test_linear_and_embedding_moments_and_proxies_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """proxy(W, f) = sum_j m_j ||W[:, j] - Q(W)[:, j]||^2 with m = moments / N (embeddings: per row).

    Q is replaced by rounding to integers (half to even), so the error is known exactly."""
    monkeypatch.setattr(stats, "quantized_copy", lambda w, f, method: torch.round(w))
    lin = BlockRef(0, Block("lin.weight", BlockKind.ATTENTION, (2, 2), 0, projection="q_proj"), "lin", "weight")
    other = BlockRef(1, Block("other.weight", BlockKind.ATTENTION, (2, 2), 0, projection="k_proj"), "other", "weight")
    emb = BlockRef(2, Block("emb.weight", BlockKind.EMBEDDING, (6, 2)), "emb", "weight", step=-1)
    col = Collector(_collector(4).arch, [lin, other, emb], ["BF16", "int4_g32"], num_tokens=4)
    model = Tiny()
    handles = col.attach(model, 0)
    assert len(handles) == 2  # lin and other (the embedding has no hook)
    hook = col._linear_hook("lin.weight")
    hook(None, (torch.tensor([[[1.0, 2.0], [3.0, 1.0], [2.0, 2.0]]]),), {})
    hook(None, (), {"hidden_states": torch.tensor([[1.0, 1.0]])})
    for h in handles:
        h.remove()
    # sum of x^2 over the 4 tokens: [1 + 9 + 4 + 1, 4 + 1 + 4 + 1] = [15, 10]
    np.testing.assert_allclose(col.moments["lin.weight"].numpy(), [15.0, 10.0])
    col.embedding_moments(torch.tensor([[0, 2, 2], [5, 0, 2]]), 6)
    np.testing.assert_allclose(col.moments["emb.weight"].numpy(), [2, 0, 3, 0, 0, 1])

    col.finish(model, 0)
    # W - round(W) = [[0.25, 1.5 - 2], [0, -0.75 + 1]] = [[0.25, -0.5], [0, 0.25]]
    # per column squared: [0.0625 + 0, 0.25 + 0.0625] = [0.0625, 0.3125]; m = [15, 10] / 4 = [3.75, 2.5]
    # proxy = 0.0625 * 3.75 + 0.3125 * 2.5 = 0.234375 + 0.78125 = 1.015625; weight_sq = 0.375
    np.testing.assert_allclose(col.moments["lin.weight"].numpy(), [3.75, 2.5])
    assert col.proxy["lin.weight"] == {"BF16": pytest.approx(1.015625, rel=1e-12)}  # int4_g32 needs rows of 32
    assert col.weight_sq["lin.weight"] == {"BF16": pytest.approx(0.375, rel=1e-12)}
    # no input seen: zero moments, zero proxy, but the unweighted error is still recorded
    assert col.proxy["other.weight"] == {"BF16": 0.0} and col.weight_sq["other.weight"]["BF16"] == 0.375
    assert col.moments["other.weight"].tolist() == [0.0, 0.0]

    col.finish(model, -1)
    # embedding rows minus rounded rows: r0 [0.25, 0] -> 0.0625; r1 [0.5, 0.5] -> round to [0, 0] -> 0.5;
    # r2 [1, 0.75] -> [0, -0.25] -> 0.0625; r3 0; r4 0; r5 [-0.25, 0] -> 0.0625
    # m = [2, 0, 3, 0, 0, 1] / 4: proxy = (2 * 0.0625 + 3 * 0.0625 + 1 * 0.0625) / 4 = 0.09375
    # weight_sq = 0.0625 + 0.5 + 0.0625 + 0.0625 = 0.6875
    assert col.proxy["emb.weight"]["BF16"] == pytest.approx(0.09375, rel=1e-12)
    assert col.weight_sq["emb.weight"]["BF16"] == pytest.approx(0.6875, rel=1e-12)


@pytest.mark.parametrize("per_row", [False, True])
def test_squared_error_chunks_add_up(per_row: bool) -> None:
    g = torch.Generator().manual_seed(0)
    w, q = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    want = ((w.double() - q.double()) ** 2).sum(1 if per_row else 0)
    for chunk_bytes in (1, 20, 40, 60, 16 << 20):  # 1, 1, 2, 3 rows and all rows per chunk
        got = _squared_error(w, q, per_row, chunk_bytes)
        assert got.dtype == torch.float64 and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
    # a hand case: [[1, 2], [3, 4]] vs zeros: columns [1 + 9, 4 + 16] = [10, 20], rows [5, 25]
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert _squared_error(a, torch.zeros(2, 2), per_row, 8).tolist() == ([5.0, 25.0] if per_row else [10.0, 20.0])
