"""profiling.stats at the edges: a layer that saw a single pick, routing weights that sum to less than 1,
and linear layers called with keyword arguments (values by hand in the comments).

The fake fused experts are the ones of test_stats_hand: hidden size 2, ``act = x0^2 * x1`` and
``||expert_e(x)|| = c_e * |act|`` with ``c = (1, 2, 3, 4)``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from profiling.stats import Collector, LayerStats
from tests.profiling.test_stats_hand import LAYER, FakeExperts, _collector, _expert_refs


def _route(col: Collector, x: list, idx: list, w: list) -> LayerStats:
    hook = col._experts_hook(LAYER, _expert_refs())
    hook(FakeExperts(), (torch.tensor(x, dtype=torch.float64), torch.tensor(idx),
                         torch.tensor(w, dtype=torch.float64)), {})
    return col.layer_stats[LAYER]


def test_one_token_one_pick() -> None:
    """A single token routed to expert 2 alone (top-1) with weight 0.25 (not renormalised, as DeepSeek-V2's
    scaled scores): 1 pick in all, summed weight 0.25; act = 1^2 * 2 = 2, ||y|| = 3 * 2 = 6."""
    s = _route(_collector(1), [[1.0, 2.0]], [[2]], [[0.25]])
    assert s.tokens == 1 and s.count.tolist() == [0.0, 0.0, 1.0, 0.0]
    assert s.frequency().tolist() == [0.0, 0.0, 1.0, 0.0]  # 1 / 1
    assert s.routing_mass().tolist() == [0.0, 0.0, 1.0, 0.0]  # 0.25 / 0.25
    assert s.mean_score().tolist() == [0.0, 0.0, 0.25, 0.0]
    assert s.saliency().tolist() == [0.0, 0.0, 1.5, 0.0]  # 0.25 * 6 / 1


def test_routing_mass_of_weights_summing_below_one() -> None:
    """Two tokens, top-2, weights (0.25, 0.125) and (0.125, 0.0625): total weight 0.5625 < 1.
    Picks: e0 {t0}, e1 {t0, t1}, e3 {t1} -> 4 picks; weights e0 0.25, e1 0.125 + 0.125 = 0.25, e3 0.0625."""
    s = _route(_collector(2), [[1.0, 1.0], [2.0, 1.0]], [[0, 1], [1, 3]], [[0.25, 0.125], [0.125, 0.0625]])
    assert s.weight.tolist() == [0.25, 0.25, 0.0, 0.0625]
    np.testing.assert_allclose(s.routing_mass(), [0.25 / 0.5625, 0.25 / 0.5625, 0.0, 0.0625 / 0.5625], rtol=1e-12)
    assert s.frequency().tolist() == [0.25, 0.5, 0.0, 0.25]
    assert s.mean_score().tolist() == [0.25, 0.125, 0.0, 0.0625]


@pytest.mark.parametrize("kwargs", [
    {"input": torch.tensor([[1.0, 2.0], [3.0, -1.0]])},  # nn.Linear.forward(input)
    {"hidden_states": torch.tensor([[1.0, 2.0], [3.0, -1.0]])},
    # both given: ``input`` is the linear layer's own argument
    {"input": torch.tensor([[1.0, 2.0], [3.0, -1.0]]), "hidden_states": torch.tensor([[5.0, 5.0]])},
])
def test_linear_hook_reads_keyword_inputs(kwargs: dict) -> None:
    # sum of x^2 over the tokens: [1 + 9, 4 + 1] = [10, 5]
    col = _collector(2)
    col._linear_hook("lin.weight")(None, (), kwargs)
    assert col.moments["lin.weight"].tolist() == [10.0, 5.0]


def test_linear_hook_on_a_module_called_with_input_keyword() -> None:
    lin = torch.nn.Linear(2, 3, bias=False)
    col = _collector(3)
    handle = lin.register_forward_pre_hook(col._linear_hook("lin.weight"), with_kwargs=True)
    lin(input=torch.tensor([[[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]]]))
    handle.remove()
    # [1 + 0.25 + 4, 4 + 1 + 0] = [5.25, 5]
    assert col.moments["lin.weight"].tolist() == [5.25, 5.0]
