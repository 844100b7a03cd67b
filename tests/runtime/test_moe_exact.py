"""runtime.moe's masked DeepSeek-V2 routing against probabilities computed by hand.

The router's weight is the identity, so the router logits are the hidden state itself; hidden states of
``log(k)`` make the softmax over the unmasked experts ``k / sum(k)``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from runtime.moe import _masked_forward, _masked_v2_forward

LN = [math.log(k) for k in range(1, 5)]  # ln 1, ln 2, ln 3, ln 4


class V2Router(nn.Module):
    def __init__(self, method: str, top_k: int = 2, num_group: int = 1, topk_group: int = 1,
                 dtype: torch.dtype = torch.float32, device: str = "cpu") -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(4, dtype=dtype, device=device))
        self.hidden_dim, self.num_experts, self.top_k = 4, 4, top_k
        self.topk_method, self.num_group, self.topk_group = method, num_group, topk_group
        self.routed_scaling_factor = 2.0


def _routed(weights: torch.Tensor, index: torch.Tensor) -> list:
    """Per token, {expert: weight} (top-k order is unspecified: sorted=False)."""
    return [dict(sorted(zip(i.tolist(), w.tolist()))) for w, i in zip(weights, index)]


def _mask(*experts: int) -> torch.Tensor:
    m = torch.zeros(4, dtype=torch.bool)
    m[list(experts)] = True
    return m


def test_greedy_softmax_over_the_unmasked_experts() -> None:
    """Logits ln[1, 2, 3, 4], expert 3 masked: softmax over [1, 2, 3] = [1/6, 1/3, 1/2, 0]; top-2 = experts 2 and 1,
    not renormalised, times routed_scaling_factor 2: [1, 2/3]."""
    hs = torch.tensor([LN])
    logits, weights, index = _masked_v2_forward(V2Router("greedy"), hs, _mask(3))
    assert torch.equal(logits, hs)  # the router logits are returned unmasked
    got = _routed(weights, index)
    assert list(got[0]) == [1, 2]
    assert got[0][1] == pytest.approx(2 / 3, rel=1e-6) and got[0][2] == pytest.approx(1.0, rel=1e-6)
    # without a mask: softmax [1, 2, 3, 4] / 10 -> experts 3 and 2: [0.8, 0.6]
    got = _routed(*_masked_v2_forward(V2Router("greedy"), hs, _mask())[1:])
    assert list(got[0]) == [2, 3] and got[0][2] == pytest.approx(0.6) and got[0][3] == pytest.approx(0.8)


def test_group_limited_greedy_picks_the_group_of_the_best_unmasked_score() -> None:
    """Logits ln[4, 1, 3, 2], groups {0, 1} and {2, 3}, one group, top-2.
    No mask: softmax [0.4, 0.1, 0.3, 0.2]; group maxima 0.4 and 0.3 -> group 0: experts 0, 1 -> [0.8, 0.2].
    Expert 0 masked: softmax over [1, 3, 2] = [0, 1/6, 1/2, 1/3]; maxima 1/6 and 1/2 -> group 1: experts 2, 3
    -> 2 * [1/2, 1/3] = [1, 2/3]."""
    hs = torch.tensor([[LN[3], LN[0], LN[2], LN[1]]])
    router = V2Router("group_limited_greedy", num_group=2, topk_group=1)
    got = _routed(*_masked_v2_forward(router, hs, _mask())[1:])[0]
    assert list(got) == [0, 1] and got[0] == pytest.approx(0.8) and got[1] == pytest.approx(0.2)
    got = _routed(*_masked_v2_forward(router, hs, _mask(0))[1:])[0]
    assert list(got) == [2, 3] and got[2] == pytest.approx(1.0) and got[3] == pytest.approx(2 / 3)


def test_tokens_are_routed_independently() -> None:
    """Three tokens (a [1, 3, 4] batch is flattened to rows), expert 1 masked: each row's softmax is over its own
    unmasked logits -- row [ln 1, ln 2, ln 3, ln 4] -> [1, 3, 4] / 8: experts 3, 2 -> 2 * [1/2, 3/8]."""
    rows = [LN, LN[::-1], [0.0, 0.0, 0.0, 0.0]]
    hs = torch.tensor([rows])
    _, weights, index = _masked_v2_forward(V2Router("greedy"), hs, _mask(1))
    assert weights.shape == (3, 2) and index.shape == (3, 2)
    got = _routed(weights, index)
    assert list(got[0]) == [2, 3] and got[0][2] == pytest.approx(0.75) and got[0][3] == pytest.approx(1.0)
    # reversed logits ln[4, 3, 2, 1] -> [4, 2, 1] / 7 over experts 0, 2, 3: experts 0, 2 -> 2 * [4/7, 2/7]
    assert list(got[1]) == [0, 2] and got[1][0] == pytest.approx(8 / 7) and got[1][2] == pytest.approx(4 / 7)
    # equal logits: 1/3 each over three unmasked experts -> 2/3 each, never expert 1
    assert 1 not in got[2] and all(v == pytest.approx(2 / 3) for v in got[2].values())


def test_half_precision_router_scores_in_float32() -> None:
    """The logits are computed in float32 from a bf16 router, so the scores are float32 softmax values."""
    hs = torch.tensor([LN], dtype=torch.bfloat16)
    logits, weights, index = _masked_v2_forward(V2Router("greedy", dtype=torch.bfloat16), hs, _mask(3))
    assert logits.dtype == torch.float32 and weights.dtype == torch.float32
    p = torch.tensor(LN, dtype=torch.bfloat16).float()[:3].softmax(-1)  # what the bf16 hidden states hold
    got = _routed(weights, index)[0]
    assert got[2] == pytest.approx(2 * float(p[2]), rel=1e-6) and got[1] == pytest.approx(2 * float(p[1]), rel=1e-6)


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_mask_follows_the_router_device(method: str) -> None:
    """The mask is built on the CPU; a router on another device (here ``meta``, as on a GPU) must get it moved to
    its logits' device rather than fail on mixed devices."""
    router = V2Router(method, num_group=2, topk_group=1, device="meta")
    hs = torch.empty(3, 4, device="meta")
    logits, weights, index = _masked_v2_forward(router, hs, _mask(0))
    assert logits.device.type == weights.device.type == index.device.type == "meta"
    assert weights.shape == (3, 2) and index.shape == (3, 2)
    # through the patched forward too
    out = _masked_forward(router, _mask(0))(hs)
    assert out[1].device.type == "meta"
