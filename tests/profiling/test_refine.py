"""profiling.refine: the multipliers' fit, the split of a plan's prediction, and the loop on a tiny model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizer.architectures import load_architecture
from optimizer.budget import Budget
from optimizer.byte_model import uniform_bytes
from optimizer.errors import InputError
from optimizer.formulation.instance import FormulationOptions
from optimizer.solve import SolveOptions, optimize
from profiling.refine import (
    Measured,
    Multipliers,
    baseline_plans,
    fit_multipliers,
    plan_hash,
    plan_parts,
    refine,
    scaled_profile,
)
from runtime.testing import made_up_plan, made_up_profile
from runtime.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))


@pytest.fixture(scope="module")
def profile(tiny: Path):
    return made_up_profile(load_architecture(tiny))


def test_fit_recovers_exact_multipliers(tiny: Path) -> None:
    """KL = 0.1 + 2 F + 0.5 P + 3 K exactly: NNLS returns those coefficients (four plans, four unknowns)."""
    plan = made_up_plan(tiny)
    parts = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (2.0, 0.5, 0.25)]
    rows = [Measured("x", plan, p, 0.1 + 2 * p[0] + 0.5 * p[1] + 3 * p[2], 0.0) for p in parts]
    m = fit_multipliers(rows)
    assert (m.floor, m.formats, m.prune, m.topk) == pytest.approx((0.1, 2.0, 0.5, 3.0), abs=1e-9)


def test_fit_keeps_a_lever_that_never_varies_nonzero(tiny: Path) -> None:
    plan = made_up_plan(tiny)
    rows = [Measured("x", plan, (f, 0.0, 0.0), 3 * f, 0.0) for f in (1.0, 2.0, 4.0)]
    m = fit_multipliers(rows)
    assert m.formats == pytest.approx(3.0) and m.prune == 1.0 and m.topk == 1.0


def test_parts_sum_to_the_solvers_objective(profile) -> None:
    """The ILP minimises exactly F + P + K of the predicted_loss objective, so the parts add up to it."""
    arch = profile.architecture
    budget = Budget(int(uniform_bytes(arch, "BF16") * 0.3), {})
    plan = optimize(profile, budget, FormulationOptions(objective="predicted_loss"),
                    SolveOptions(reproducible=True))
    assert sum(plan_parts(profile, plan)) == pytest.approx(plan.solve.objective, rel=1e-9)
    doubled = scaled_profile(profile, Multipliers(formats=2.0, prune=2.0, topk=2.0))
    assert sum(plan_parts(doubled, plan)) == pytest.approx(2 * plan.solve.objective, rel=1e-9)
    assert doubled.hash != profile.hash or not profile.hash


def test_refine_hands_over_the_best_measured_plan(tiny: Path, profile) -> None:
    arch = profile.architecture
    budget = Budget(int(uniform_bytes(arch, "BF16") * 0.45), {})
    res = refine(profile, tiny, budget, rounds=2, tokens=256, window=64)
    hashes = {plan_hash(m.plan) for m in res.measured}
    assert len(hashes) == len(res.measured)  # each distinct plan measured once
    baselines = baseline_plans(profile, budget)
    assert set(baselines) == {"uniform", "greedy", "sequential", "quantize_only", "llamacpp"}
    assert {plan_hash(p) for p in baselines.values()} <= hashes  # every baseline was measured
    assert res.best.kl == min(m.kl for m in res.measured)
    assert all(m.plan.bytes.total <= budget.available for m in res.measured)
    assert f"'{res.best.name}'" in res.best.plan.solve.message
    assert np.isfinite(res.multipliers.formats) and res.tokens == 256


def test_cli_writes_plan_profile_and_log(tiny: Path, profile, tmp_path: Path) -> None:
    from optimizer.plan import load_plan
    from optimizer.profile import load_profile, save_profile
    from profiling.cli import main

    save_profile(profile, tmp_path / "p.json")
    budget = str(int(uniform_bytes(profile.architecture, "BF16") * 0.45))
    out = {"-o": tmp_path / "plan.json", "--profile-out": tmp_path / "p2.json", "--log": tmp_path / "log.json"}
    args = ["refine", str(tmp_path / "p.json"), "--model", str(tiny), "--budget", budget, "--context", "0",
            "--overhead", "0", "--rounds", "1", "--max-tokens", "256", "--window", "64", "--no-progress"]
    assert main(args + [x for flag, path in out.items() for x in (flag, str(path))]) == 0
    import json

    log = json.loads((tmp_path / "log.json").read_text())
    best = min(log["measured"], key=lambda m: m["measured_kl"])
    assert log["handed_over"] == best["name"] and log["tokens"] == 256
    plan = load_plan(tmp_path / "plan.json")
    assert plan.bytes.total <= int(budget) and best["name"] in plan.solve.message
    assert load_profile(tmp_path / "p2.json").architecture.shape_hash() == profile.architecture.shape_hash()
    assert main(args[:-1] + ["--budget", "1B", "-o", str(tmp_path / "x.json")]) == 2
    # --also: another profile's ILP plan is measured too (here the profile itself: its plan is no new candidate,
    # so the log is the same); a profile of another model is refused with one line
    assert main(args + ["--also", str(tmp_path / "p.json"), "--log", str(tmp_path / "log2.json"),
                        "-o", str(tmp_path / "plan2.json")]) == 0
    assert len(json.loads((tmp_path / "log2.json").read_text())["measured"]) == len(log["measured"])
    save_profile(made_up_profile(load_architecture(make_tiny_model("deepseek_v3", tmp_path / "dsv3"))),
                 tmp_path / "other.json")
    assert main(args + ["--also", str(tmp_path / "other.json"), "-o", str(tmp_path / "plan3.json")]) == 2
    assert not (tmp_path / "x.json").exists()


def test_an_alternative_profile_proposes_its_ilp_plan_and_measurement_decides(tiny: Path, profile) -> None:
    from optimizer.profile import with_costs

    arch = profile.architecture
    budget = Budget(int(uniform_bytes(arch, "BF16") * 0.45), {})
    # the same profile with format costs scaled 50x: its ILP spends bytes differently, so it proposes a new plan
    other = with_costs(profile, sensitivity=type(profile.sensitivity)(
        profile.sensitivity.formats, profile.sensitivity.values * 50.0, profile.sensitivity.measurement))
    alone = refine(profile, tiny, budget, rounds=0, tokens=256, window=64)
    both = refine(profile, tiny, budget, rounds=0, tokens=256, window=64, alternatives={"source": other})
    names = [m.name for m in both.measured]
    alt_plan = optimize(other, budget, FormulationOptions(objective="predicted_loss"), SolveOptions())
    assert plan_hash(alt_plan) not in {plan_hash(m.plan) for m in alone.measured}  # a plan nothing else proposed
    assert "ilp (source)" in names and plan_hash(both.measured[names.index("ilp (source)")].plan) == plan_hash(alt_plan)
    assert both.best.kl == min(m.kl for m in both.measured) <= alone.best.kl
    dsv3 = made_up_profile(load_architecture(make_tiny_model("deepseek_v3", tiny.parent / "dsv3-other")))
    with pytest.raises(InputError, match="the x profile is of another model"):
        refine(profile, tiny, budget, rounds=0, tokens=256, window=64, alternatives={"x": dsv3})


def test_calibration_source_is_read_only_when_unchanged(profile, tmp_path: Path) -> None:
    from optimizer.profile import save_profile
    from profiling.refine import calibration_source

    digest = save_profile(profile, tmp_path / "single.json")
    details = {"calibration": {"source": {"path": str(tmp_path / "single.json"), "hash": digest}}}
    notes: list[str] = []
    found = calibration_source(details, tmp_path / "calibrated.json", say=notes.append)
    assert list(found) == ["source"] and found["source"].hash == digest and not notes
    # moved beside the calibrated profile: found by name there
    moved = {"calibration": {"source": {"path": "/nowhere/single.json", "hash": digest}}}
    assert list(calibration_source(moved, tmp_path / "calibrated.json")) == ["source"]
    stale = {"calibration": {"source": {"path": str(tmp_path / "single.json"), "hash": "sha256:other"}}}
    assert calibration_source(stale, tmp_path / "c.json", say=notes.append) == {} and "changed" in notes[-1]
    assert calibration_source({}, tmp_path / "c.json") == {}
    assert calibration_source({"calibration": {"source": {"path": str(tmp_path / "gone.json")}}}, tmp_path / "c.json",
                              say=notes.append) == {} and "not readable" in notes[-1]
