"""profiling.calibrate: the link's fit by hand, and the calibration of a tiny model's profile end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from optimizer.errors import InputError
from optimizer.formats import get_format
from optimizer.profile import load_profile
from profiling.calibrate import Calibrator, Link, _middle, calibrated_profile, fit_link
from profiling.cli import main
from profiling.run import RunOptions, details_path, run_profile

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FORMATS = ["int2_g32", "int4_g32", "int8_g32", "BF16"]


def test_fit_link_recovers_a_hand_made_link() -> None:
    """M = (w_g P)^p with p = 1/2, w_a = 2, w_b = 8: log M = p log P + p log w_g is linear, so the fit is exact."""
    rows = [("a", 1.0, math.sqrt(2)), ("a", 4.0, math.sqrt(8)), ("b", 1.0, math.sqrt(8)), ("b", 0.25, math.sqrt(2))]
    link = fit_link(rows)
    assert link.p == pytest.approx(0.5)
    assert link.weights == pytest.approx({"a": 2.0, "b": 8.0})
    # S = w v r P; here v = r = 1
    assert link.factor("a", 3, "int4_g32") == pytest.approx(2.0)


def test_fit_link_refuses_what_it_cannot_fit() -> None:
    with pytest.raises(InputError, match="not positive"):
        fit_link([("a", 1.0, 1.0), ("a", 2.0, 0.5), ("a", 4.0, 0.25)])  # KL falls as the proxy grows: p = -1
    with pytest.raises(InputError, match="too few"):
        fit_link([("a", 1.0, 1.0), ("b", 2.0, 0.5)])  # one plan per group: nothing left to fit p from
    with pytest.raises(InputError, match="too few"):
        fit_link([("a", 1.0, 0.0), ("a", 2.0, 0.0), ("a", 4.0, 1.0)])  # zero KL carries no information


def test_reference_is_the_geometric_middle() -> None:
    """KLs 0.01 .. 1: the geometric middle is 0.1; 0.2 is a factor 2 from it, 0.01 and 1 a factor 10."""
    uniform = {"a": {"measured_kl": 0.01}, "b": {"measured_kl": 0.2}, "c": {"measured_kl": 1.0}}
    assert _middle(uniform) == "b"
    with pytest.raises(InputError, match="positive"):
        _middle({"a": {"measured_kl": 0.0}})


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    from runtime.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("calibrate")
    model = make_tiny_model("qwen3_moe", root / "qwen3_moe")
    res = run_profile(RunOptions(model=model, max_tokens=128, window=64, formats=FORMATS, output=root / "p.json",
                                 measure=["prune", "topk"], progress=False))
    return model, res.profile_path


def test_calibration_predicts_every_uniform_plan_and_rewrites_only_calibrated_cells(profiled) -> None:
    model, path = profiled
    profile = load_profile(path)
    details = json.loads(details_path(path).read_text())
    cal = Calibrator(profile, details, model).run(layer_probe="int2_g32")
    uniform = [r for r in cal.rows if r["plan"].startswith("uniform")]
    assert [r["format"] for r in uniform] == ["int2_g32", "int4_g32", "int8_g32"]
    for r in uniform:  # the format factors make S^p reproduce each measured uniform plan
        assert r["predicted_kl"] == pytest.approx(r["measured_kl"], rel=1e-6)
    layers = sorted({r["layer"] for r in cal.rows if "layer" in r})
    assert layers == list(range(profile.architecture.num_layers)) and np.median(
        list(cal.link.layers.values())) == pytest.approx(1.0)
    assert cal.reference in ("int2_g32", "int4_g32", "int8_g32") and cal.scale > 0
    new = calibrated_profile(profile, cal, details["proxy_raw"], details["groups"])
    old, cells = np.asarray(profile.sensitivity.values), np.asarray(new.sensitivity.values)
    for i, b in enumerate(profile.architecture.blocks):
        for j, f in enumerate(profile.sensitivity.formats):
            raw = details["proxy_raw"].get(b.name, {}).get(f)
            if details["groups"].get(b.name) in cal.link.weights and raw is not None and np.isfinite(old[i, j]):
                want = cal.scale * cal.link.factor(details["groups"][b.name], b.layer, f) * raw
                assert cells[i, j] == pytest.approx(want, rel=1e-12)
            elif b.quantizable and np.isfinite(old[i]).sum() == 1 and np.isfinite(old[i, j]):
                assert cells[i, j] == 0.0  # one candidate: every uniform plan holds it, the fit explains it
            else:
                assert np.array_equal(cells[i, j], old[i, j], equal_nan=True)
    # cheaper formats cost more in every calibrated block, as the measured plans say
    quantized = [j for j, f in enumerate(profile.sensitivity.formats) if get_format(f).quantized]
    ok = np.isfinite(cells[:, quantized]).all(axis=1)
    assert (np.diff(cells[ok][:, quantized], axis=1) <= 0).all()


def test_cli_writes_the_calibrated_profile_and_refuses_bad_flags(profiled, tmp_path, capsys) -> None:
    model, path = profiled
    out = tmp_path / "cal.json"
    assert main(["calibrate", str(path), "--model", str(model), "-o", str(out), "--layer-probe", "none",
                 "--no-progress"]) == 0
    profile = load_profile(out)
    assert "calibrated on whole plans" in profile.sensitivity.measurement.method
    cal = json.loads(details_path(out).read_text())["calibration"]
    assert cal["link"]["layer_factors"] == {} and len(cal["link"]["format_factors"]) == 3
    assert not out.with_name(out.name + ".calibration.jsonl").exists()  # the journal goes once OUT is written
    capsys.readouterr()
    assert main(["calibrate", str(path), "--model", str(model), "-o", str(out), "--layer-probe", "Q4_K"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --layer-probe: Q4_K is not a quantized candidate") and err.count("\n") == 1
    assert main(["calibrate", str(tmp_path / "none.json"), "--model", str(model), "-o", str(out)]) == 2


def test_link_json_names_every_factor() -> None:
    link = Link(0.5, {"a": 2.0}, {3: 1.5}, {"int4_g32": 0.25})
    assert link.to_json() == {"p": 0.5, "group_weights": {"a": 2.0}, "layer_factors": {"3": 1.5},
                              "format_factors": {"int4_g32": 0.25}}
    assert link.factor("a", 3, "int4_g32") == pytest.approx(2.0 * 1.5 * 0.25)
    assert link.factor("a", 4, "int8_g32") == pytest.approx(2.0)


def test_single_candidate_cells_are_absorbed_by_hand() -> None:
    from profiling.calibrate import _absorb_fixed_choice

    row = np.array([np.nan, np.nan, 0.03])  # BF16 only: every uniform plan holds it, the fit explains it
    assert _absorb_fixed_choice(row) == 1 and row.tolist()[2] == 0.0
    row = np.array([0.1, 0.03])  # two candidates: the choice matters, the cells stay
    assert _absorb_fixed_choice(row) == 0 and row.tolist() == [0.1, 0.03]
    row = np.array([np.nan, 0.0])  # already free: nothing to do
    assert _absorb_fixed_choice(row) == 0


def test_uniform_plan_stores_odd_rows_in_the_same_bits() -> None:
    """A block that no g64 group divides (R3's 80-wide down_proj) takes int3_g80 in "uniform int3_g64"; a block
    with no 3-bit candidate stays as it is (left out of the plan)."""
    from types import SimpleNamespace

    admits = {"gate": {"int3_g64", "int4_g64"}, "down": {"int3_g80", "int4_g80"}, "odd": {"int4_g80"}}
    plan = Calibrator.uniform(SimpleNamespace(admits=admits), "int3_g64")  # type: ignore[arg-type]
    assert plan == {"gate": "int3_g64", "down": "int3_g80"}


def test_validate_uniform_plans_use_the_same_bits_stand_in() -> None:
    from optimizer.synthetic import synthetic_profile
    from profiling.validate import uniform_plans

    formats = ("int3_g64", "int4_g64", "int3_g80", "int4_g80", "BF16")
    p = synthetic_profile(seed=0, formats=formats, num_layers=2, num_experts=4, top_k=2, expert_inter=80)
    plans = {pl["kind"]: pl["formats"] for pl in uniform_plans(p)}
    down = [b.name for b in p.architecture.blocks if b.is_routed_expert and b.projection == "down_proj"]
    gate = [b.name for b in p.architecture.blocks if b.is_routed_expert and b.projection == "gate_proj"]
    assert {plans["uniform int3_g64"][n] for n in down} == {"int3_g80"}
    assert {plans["uniform int3_g64"][n] for n in gate} == {"int3_g64"}
    # int3_g80 cannot store a gate row of 256 either: its stand-in there is int3_g64
    assert {plans["uniform int3_g80"][n] for n in gate} == {"int3_g64"}
