"""profiling.prediction: the objective -> KL map fitted by hand, its place in the profile contract and in
plan.json, and ``fit-prediction`` then ``validate`` on a tiny model end to end."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from optimizer.errors import InputError
from optimizer.formulation.instance import FormulationOptions
from optimizer.profile import Measurement, Prediction, load_profile, profile_from_json, save_profile, with_costs
from optimizer.solve import SolveOptions, optimize
from profiling.cli import main
from profiling.model_io import ProfilingError
from profiling.prediction import fit_power
from profiling.run import RunOptions, details_path, run_profile
from tests.optimizer.test_formulation import CASE_A, CASE_A_BUDGET, hand_profile

MAP = Prediction(2.0, 0.5, 3, 0.0, Measurement("hand", tokens=64, seed=1))


def test_fit_power_by_hand() -> None:
    # KL = 2 O^0.5 exactly at O = 1, 4, 16 (KL 2, 4, 8): a = 2, q = 1/2, no residual.
    a, q, rmse = fit_power(np.array([1.0, 4.0, 16.0]), np.array([2.0, 4.0, 8.0]))
    assert (a, q, rmse) == pytest.approx((2.0, 0.5, 0.0), abs=1e-12)
    # KL = O x 2^(+-1): (O, KL) = (1, 2), (1, 1/2), (4, 8), (4, 2). In log2 units x = (0, 0, 2, 2),
    # y = (1, -1, 3, 1): means 1 and 1, Sxy = 4, Sxx = 4, so slope q = 1, intercept 0 (a = 1), residuals +-log 2.
    a, q, rmse = fit_power(np.array([1.0, 1.0, 4.0, 4.0]), np.array([2.0, 0.5, 8.0, 2.0]))
    assert (a, q, rmse) == pytest.approx((1.0, 1.0, math.log(2)), abs=1e-12)
    # plans priced 0 (nothing compressed) or measured 0 carry no log: skipped
    a, q, _ = fit_power(np.array([0.0, 1.0, 4.0, 16.0]), np.array([0.5, 2.0, 4.0, 8.0]))
    assert (a, q) == pytest.approx((2.0, 0.5))


def test_fit_power_refuses_what_no_map_fixes() -> None:
    with pytest.raises(ProfilingError, match="does not rise with the objective"):
        fit_power(np.array([1.0, 2.0, 4.0]), np.array([3.0, 2.0, 1.0]))
    with pytest.raises(ProfilingError, match="need >= 3 plans"):
        fit_power(np.array([1.0, 2.0, 0.0]), np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ProfilingError, match="need >= 3 plans"):
        fit_power(np.array([2.0, 2.0, 2.0]), np.array([1.0, 2.0, 3.0]))


def test_prediction_round_trips_and_is_checked(tmp_path) -> None:
    p = dataclasses.replace(hand_profile(CASE_A), prediction=MAP)
    path = tmp_path / "p.json"
    save_profile(p, path)
    back = load_profile(path)
    assert back.prediction == MAP
    assert back.prediction.kl(4.0) == 4.0 and back.prediction.kl(0.0) == 0.0
    doc = json.loads(path.read_text())
    doc["prediction"]["exponent"] = 0
    with pytest.raises(InputError, match="exponent"):
        profile_from_json(doc)
    del doc["prediction"]["exponent"]
    with pytest.raises(InputError, match="exponent"):
        profile_from_json(doc)
    # new costs make the old map meaningless: with_costs drops it
    assert with_costs(back, formats=back.formats).prediction is None


def test_plan_carries_the_predicted_kl_only_for_the_fitted_objective() -> None:
    p = dataclasses.replace(hand_profile(CASE_A, router=True, norm=True), prediction=MAP)
    plan = optimize(p, CASE_A_BUDGET, FormulationOptions(objective="predicted_loss"), SolveOptions(reproducible=True))
    # CASE A's optimum is 0.23 (tests/optimizer/test_formulation.py): KL = 2 * 0.23^0.5
    assert plan.solve.objective == pytest.approx(0.23, abs=1e-12)
    assert plan.predicted["kl"] == pytest.approx(2 * 0.23 ** 0.5, rel=1e-12)
    other = optimize(p, CASE_A_BUDGET, FormulationOptions(objective="routing_mass"), SolveOptions(reproducible=True))
    assert "kl" not in other.predicted
    no_map = optimize(hand_profile(CASE_A, router=True, norm=True), CASE_A_BUDGET,
                      FormulationOptions(objective="predicted_loss"), SolveOptions(reproducible=True))
    assert "kl" not in no_map.predicted


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    from runtime.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("prediction")
    model = make_tiny_model("qwen3_moe", root / "qwen3_moe")
    res = run_profile(RunOptions(model=model, max_tokens=128, window=64, formats=["int2_g32", "int4_g32", "BF16"],
                                 output=root / "p.json", measure=["prune", "topk"], progress=False))
    return model, res.profile_path


@pytest.mark.usefixtures("one_torch_thread")
def test_fit_then_validate_on_a_tiny_model(profiled, tmp_path, capsys) -> None:
    model, path = profiled
    out = tmp_path / "predicted.json"
    assert main(["fit-prediction", str(path), "--model", str(model), "-o", str(out), "--plans", "6",
                 "--no-progress"]) == 0
    assert "KL ~" in capsys.readouterr().out
    fitted = load_profile(out)
    record = json.loads(details_path(out).read_text())["prediction"]
    assert fitted.prediction.plans == 6 + 2 == len(record["rows"])  # + uniform int2 and int4
    assert fitted.prediction.exponent > 0 and fitted.prediction.measurement.seed == 1
    # the fit is the least squares of the recorded rows, and the profile's costs are untouched
    a, q, _ = fit_power(np.array([r["objective"] for r in record["rows"]]),
                        np.array([r["measured_kl"] for r in record["rows"]]))
    assert (fitted.prediction.scale, fitted.prediction.exponent) == pytest.approx((a, q), rel=1e-12)
    original = load_profile(path)
    assert np.array_equal(fitted.sensitivity.values, original.sensitivity.values, equal_nan=True)
    assert not (out.parent / (out.name + ".prediction.jsonl")).exists()  # the journal goes once OUT is written
    js = tmp_path / "v.json"
    assert main(["validate", str(out), "--model", str(model), "--plans", "4", "--no-progress", "--no-uniform",
                 "--json", str(js)]) == 0
    check = json.loads(js.read_text())["prediction"]
    ratios = [r["measured_kl"] / fitted.prediction.kl(r["predicted"]["profile"])
              for r in json.loads(js.read_text())["rows"]]
    assert check["median_measured_over_predicted_kl"] == pytest.approx(float(np.median(ratios)))
    assert "median measured/predicted KL" in capsys.readouterr().out


def test_resume_without_a_journal_is_one_line(profiled, tmp_path, capsys) -> None:
    model, path = profiled
    assert main(["fit-prediction", str(path), "--model", str(model), "-o", str(tmp_path / "x.json"),
                 "--resume", "--no-progress"]) == 2
    assert "--resume: no journal" in capsys.readouterr().err
