"""profiling.prune_curve: default counts and the ranking by hand, and a tiny model's curves end to end (the
curve's one-expert point is the profile's own single prune cost, measured again)."""
from __future__ import annotations

import numpy as np
import pytest

from optimizer.budget import Budget
from optimizer.formulation.instance import FormulationOptions
from optimizer.formulation.objectives import ObjectiveOptions, build_objective
from optimizer.profile import load_profile, served_top_k
from optimizer.solve import SolveOptions, optimize
from profiling.cli import main
from profiling.prune_curve import check_counts, default_counts, ranking
from profiling.run import RunOptions, details_path, run_profile
from tests.optimizer.test_formulation import hand_profile

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_default_counts_by_hand() -> None:
    # E = 16: 2, 4, 8, 12 and 15. E = 8 in 2 groups: 8/8 rounds to 0 groups (dropped), 2, 4, 6; E - G = 6.
    assert default_counts(16, 1) == [2, 4, 8, 12, 15]
    assert default_counts(8, 2) == [2, 4, 6]
    assert default_counts(256, 8) == [32, 64, 128, 192, 248]
    with pytest.raises(Exception, match="multiple of the 2 expert groups"):
        check_counts([3], 8, 2)
    with pytest.raises(Exception, match=r"not in \[1, 7\]"):
        check_counts([8], 8, 1)


def test_served_top_k_by_hand() -> None:
    assert served_top_k(4, 8, 1, 1, 3) == 4 and served_top_k(4, 8, 1, 1, 6) == 2
    # 8 experts in 4 groups, 2 selected groups: pruning 4 leaves 1 per group, the 2 selected groups serve 2
    assert served_top_k(4, 8, 4, 2, 4) == 2


def test_ranking_is_cheapest_first_and_interleaved_over_groups() -> None:
    spec = dict(drop=[0.4, 0.1, 0.3, 0.2, 0.05, 0.5, 0.6, 0.7], sens=[[0.0, 0.0]] * 8, topk=[1.0, 0.0])
    drops = build_objective(hand_profile([spec]), "predicted_loss").drop
    assert ranking(drops, 1)[0].tolist() == [4, 1, 3, 2, 0, 5, 6, 7]
    # groups e0-e3 | e4-e7: group ranks (1, 3, 2, 0) and (4, 5, 6, 7); rank by rank, the cheaper group first
    assert ranking(drops, 2)[0].tolist() == [4, 1, 3, 5, 2, 6, 0, 7]


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    from runtime.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("prune_curve")
    model = make_tiny_model("qwen3_moe", root / "qwen3_moe")
    res = run_profile(RunOptions(model=model, max_tokens=128, window=64, formats=["int4_g32", "BF16"],
                                 output=root / "p.json", measure=["prune", "topk"], progress=False))
    return model, res.profile_path


def test_cli_measures_curves_that_start_at_the_single_costs(profiled, tmp_path, capsys) -> None:
    model, path = profiled
    out = tmp_path / "curves.json"
    assert main(["prune-curve", str(path), "--model", str(model), "-o", str(out), "--counts", "1", "4", "7",
                 "--no-progress"]) == 0
    assert "6 points in" in capsys.readouterr().out  # 2 MoE layers (layer 0 is dense) x 3 counts
    before, after = load_profile(path), load_profile(out)
    assert after.experts.prune_curve_measurement.tokens == 128
    for single, curve in zip(before.experts.prune_cost, after.experts.prune_curve):
        assert curve.counts.tolist() == [1, 4, 7]
        assert sorted(curve.order.tolist()) == list(range(8))
        assert np.all(np.diff(np.asarray(single)[curve.order]) >= 0)  # cheapest single first
        # n = 1 masks the cheapest expert alone at the original top-2: the profile's own measurement again
        assert curve.cost[0] == pytest.approx(float(np.min(single)), rel=1e-6, abs=1e-9)
        assert np.all(curve.cost >= 0)
    assert not out.with_name(out.name + ".prune_curve.jsonl").exists()
    assert details_path(out).is_file()
    # the optimizer reads it: with and without the count term, a plan within budget
    for curve_on in (True, False):
        fo = FormulationOptions(objective="predicted_loss", objective_options=ObjectiveOptions(prune_curve=curve_on))
        plan = optimize(after, Budget(10**9, {}), fo, SolveOptions(time_limit=30))
        assert plan.solve.status.value == "optimal"


def test_cli_refuses_bad_counts_in_one_line(profiled, tmp_path, capsys) -> None:
    model, path = profiled
    assert main(["prune-curve", str(path), "--model", str(model), "-o", str(tmp_path / "x.json"),
                 "--counts", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --counts") and err.count("\n") == 1
