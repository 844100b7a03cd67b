"""``python -m optimizer``: solve / explain / objectives in-process through ``main``, the real entry point once in a
subprocess, one-line errors with exit 2 and no output file, and the bundled DeepSeek-V3 example profile."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optimizer.budget import Budget
from optimizer.cli import main
from optimizer.errors import InfeasibleError
from optimizer.formulation.decomposition import min_weight_bytes
from optimizer.formulation.instance import FormulationOptions, build_instance
from optimizer.formulation.objectives import OBJECTIVES
from optimizer.plan import load_plan
from optimizer.profile import load_profile, profile_to_json, save_profile
from optimizer.solve import optimize
from optimizer.synthetic import synthetic_profile

ROOT = Path(__file__).resolve().parents[2]
ARCH = dict(num_layers=3, num_experts=8, top_k=2, hidden=256, expert_inter=256, dense_inter=256, vocab=256)
NO_RESERVES = ["--context", "0", "--overhead", "0"]


@pytest.fixture(scope="module")
def profile():
    return synthetic_profile(seed=9, **ARCH)


@pytest.fixture(scope="module")
def sizes(profile) -> tuple[int, int]:
    """(smallest plan, every block in its largest format) in bytes."""
    inst = build_instance(profile, Budget(10**15, {}), FormulationOptions())
    q = np.flatnonzero(inst.block_quantizable)
    hi = int(np.maximum.reduceat(inst.pair_bytes, inst.pair_ptr[q]).sum() + inst.router_bytes.sum() + inst.fixed_bytes)
    return min_weight_bytes(inst), hi


@pytest.fixture()
def profile_path(tmp_path, profile) -> Path:
    path = tmp_path / "profile.json"
    save_profile(profile, path)
    return path


def budget_arg(sizes, frac: float = 0.3) -> str:
    lo, hi = sizes
    return f"{int(lo + frac * (hi - lo))}B"


def solve_args(profile_path: Path, out: Path, *extra: str, budget: str) -> list[str]:
    return ["solve", str(profile_path), "-o", str(out), "--budget", budget, *NO_RESERVES, "--time-limit", "30", *extra]


def assert_one_line_error(capsys, *needles: str) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------- success
@pytest.mark.parametrize("extra", [[], ["--target", "llamacpp"], ["--solver", "greedy"],
                                   ["--formulation", "predicted_loss"], ["--formats", "Q4_K,Q8_0", "--min-top-k", "2"],
                                   ["--no-accelerate", "--no-presolve"]])
def test_solve_writes_a_plan_and_json_summary(tmp_path, profile_path, sizes, capsys, extra) -> None:
    out = tmp_path / "plan.json"
    assert main(solve_args(profile_path, out, "--json", *extra, budget=budget_arg(sizes))) == 0
    stdout, err = capsys.readouterr()
    summary = json.loads(stdout)
    assert summary["output"] == str(out)
    plan = load_plan(out)
    assert summary["bytes_total"] == plan.bytes.total <= plan.bytes.available
    assert summary["objective"] == pytest.approx(plan.solve.objective)
    assert summary["status"] in ("optimal", "feasible")
    assert plan.solve.profile_hash == load_profile(profile_path).hash
    if "--formats" in extra:
        assert set(plan.formats.values()) <= {"Q4_K", "Q8_0", "F32"}
        assert all(lp.top_k >= 2 for lp in plan.layers)
    if "--target" in extra:
        assert plan.target.value == "llamacpp"


def test_solve_prints_tables_without_json(tmp_path, profile_path, sizes, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(solve_args(profile_path, out, budget=budget_arg(sizes))) == 0
    stdout, _ = capsys.readouterr()
    assert "bytes by kind" in stdout and "kept experts per layer" in stdout and f"wrote {out}" in stdout


def test_explain_prints_the_tables(tmp_path, profile_path, sizes, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(solve_args(profile_path, out, budget=budget_arg(sizes))) == 0
    capsys.readouterr()
    assert main(["explain", str(out)]) == 0
    stdout, _ = capsys.readouterr()
    for needle in ("bytes by kind", "weights total", "budget", "kept experts per layer", "top-k per layer",
                   "format histogram", "synthetic-9"):
        assert needle in stdout
    assert main(["explain", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr()[0])
    plan = load_plan(out)
    assert summary["kept_experts_per_layer"] == {str(lp.layer): len(lp.kept_experts) for lp in plan.layers}
    assert summary["bytes_total"] == plan.bytes.total


def test_objectives_lists_the_registry(capsys) -> None:
    assert main(["objectives"]) == 0
    stdout, _ = capsys.readouterr()
    names = [line.split()[0] for line in stdout.strip().splitlines()]
    assert names == sorted(OBJECTIVES)
    for name, (_, summary) in OBJECTIVES.items():
        assert summary in stdout


def test_real_entry_point(tmp_path, profile_path, sizes) -> None:
    out = tmp_path / "plan.json"
    run = subprocess.run([sys.executable, "-m", "optimizer",
                          *solve_args(profile_path, out, "--json", budget=budget_arg(sizes))],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["bytes_total"] == load_plan(out).bytes.total
    bad = subprocess.run([sys.executable, "-m", "optimizer",
                          *solve_args(profile_path, tmp_path / "x.json", budget="12XB")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert bad.returncode == 2
    assert len(bad.stderr.strip().splitlines()) == 1 and "--budget" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------------------------------------- errors
def _write(path: Path, doc) -> None:
    path.write_text(json.dumps(doc, allow_nan=True))


def _mutate(kind: str, doc: dict) -> dict:
    doc = copy.deepcopy(doc)
    if kind == "missing":
        del doc["experts"]["frequency"]
    elif kind == "unknown":
        doc["experts"]["bogus_field"] = 1
    elif kind == "nan":
        doc["experts"]["frequency"][0][3] = float("nan")
    elif kind == "negative":
        doc["experts"]["frequency"][1][2] = -0.25
    elif kind == "version":
        doc["version"] = 2
    return doc


BAD_PROFILES = [
    ("missing", ("experts.frequency", "missing required field")),
    ("unknown", ("experts.bogus_field", "unknown field")),
    ("nan", ("experts.frequency[0][3]", "NaN", "not a finite number")),
    ("negative", ("experts.frequency[1][2]", ">= 0")),
    ("version", ("version", "newer")),
]


@pytest.mark.parametrize("kind,needles", BAD_PROFILES, ids=[k for k, _ in BAD_PROFILES])
def test_bad_profile_exits_2_with_one_line(tmp_path, profile, sizes, capsys, kind, needles) -> None:
    path = tmp_path / "bad.json"
    _write(path, _mutate(kind, profile_to_json(profile)))
    out = tmp_path / "plan.json"
    assert main(solve_args(path, out, budget=budget_arg(sizes))) == 2
    assert_one_line_error(capsys, *needles)
    assert not out.exists()


def test_malformed_json_exits_2(tmp_path, sizes, capsys) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"schema": "moecc.profile", "version": 1,,}')
    out = tmp_path / "plan.json"
    assert main(solve_args(path, out, budget=budget_arg(sizes))) == 2
    assert_one_line_error(capsys, "malformed JSON", "line 1")
    assert not out.exists()


def test_missing_profile_file_exits_2(tmp_path, sizes, capsys) -> None:
    out = tmp_path / "plan.json"
    assert main(solve_args(tmp_path / "nope.json", out, budget=budget_arg(sizes))) == 2
    assert_one_line_error(capsys, "no such file")
    assert not out.exists()


BAD_OPTIONS = [
    (["--formats", "Q4_K,Q9_X"], "Q9_X"),
    (["--solver", "gurobi"], "--solver"),
    (["--formulation", "no_such_objective"], "--formulation"),
    (["--min-top-k", "5"], "--min-top-k"),
    (["--min-experts", "20"], "--min-experts"),
    (["--time-limit", "0"], "--time-limit"),
    (["--retain-ratio", "1.5"], "--retain-ratio"),
    (["--formulation", "importance", "--importance-alpha", "2"], "--importance-alpha"),
]


@pytest.mark.parametrize("extra,needle", BAD_OPTIONS, ids=[o[0][0] + "=" + o[0][-1] for o in BAD_OPTIONS])
def test_bad_option_exits_2_with_one_line(tmp_path, profile_path, sizes, capsys, extra, needle) -> None:
    out = tmp_path / "plan.json"
    assert main(solve_args(profile_path, out, *extra, budget=budget_arg(sizes))) == 2
    assert_one_line_error(capsys, needle)
    assert not out.exists()


@pytest.mark.parametrize("budget,needle",
                         [("12XB", "unknown unit"), ("lots", "cannot read"), ("0GB", "must be positive")])
def test_bad_budget_exits_2(tmp_path, profile_path, capsys, budget, needle) -> None:
    out = tmp_path / "plan.json"
    assert main(solve_args(profile_path, out, budget=budget)) == 2
    assert_one_line_error(capsys, "--budget", needle)
    assert not out.exists()


@pytest.mark.parametrize("extra", [[], ["--no-accelerate"], ["--target", "llamacpp"], ["--solver", "sequential"]])
def test_infeasible_budget_exits_2_and_states_the_smallest_size(tmp_path, profile, profile_path, sizes, capsys,
                                                                 extra) -> None:
    lo, _ = sizes
    out = tmp_path / "plan.json"
    fo = FormulationOptions(target="llamacpp" if "llamacpp" in extra else "hf")
    with pytest.raises(InfeasibleError) as err:
        optimize(profile, Budget(lo - 1, {}), fo)
    need = err.value.min_bytes
    assert need == min_weight_bytes(build_instance(profile, Budget(lo, {}), fo))
    assert main(solve_args(profile_path, out, *extra, budget=f"{lo - 1}B")) == 2
    assert_one_line_error(capsys, "infeasible", "smallest", f"({need} bytes)")
    assert not out.exists()
    # with reserves: the smallest size includes them
    assert main(["solve", str(profile_path), "-o", str(out), "--budget", f"{lo}B", "--context", "16",
                 "--overhead", "1KB", *extra]) == 2
    kv = profile.architecture.kv_cache.bytes_for(16)
    assert_one_line_error(capsys, f"({need + kv + 1000} bytes)")
    assert not out.exists()


def test_output_directory_is_an_input_error(tmp_path, profile_path, sizes, capsys) -> None:
    assert main(solve_args(profile_path, tmp_path, budget=budget_arg(sizes))) == 2
    assert_one_line_error(capsys, "directory")


# -------------------------------------------------------------------------------- the bundled example
def test_bundled_deepseek_v3_example_is_reproducible(tmp_path) -> None:
    from optimizer.examples.deepseek_v3 import build_deepseek_v3_profile

    bundled = load_profile(ROOT / "examples" / "deepseek-v3" / "profile.json.gz")
    moe = bundled.architecture.moe_layers
    assert len(moe) == 58 and {m.num_experts for m in moe} == {256} and {m.top_k for m in moe} == {8}
    assert (bundled.architecture.expert_groups, bundled.architecture.topk_groups) == (8, 4)
    assert all(len(f) == 256 for f in bundled.experts.frequency)
    digest = save_profile(build_deepseek_v3_profile(), tmp_path / "profile.json")
    assert digest == bundled.hash



def test_every_block_kind_of_the_example_carries_its_documented_prior() -> None:
    """Issue 12: np.array([blk.kind ...]) held strings cut to 'BlockKind.ATT', so every kind but the experts got
    no sensitivity. Expected values by hand from the module docstring: w_b = 5.0 x kind share, split by the
    1.5x rules; Q4_K (4.5 bits) has eps = 4^-(4.5 - 0.5) = 1/256, so sens[b, Q4_K] = w_b / 256.
    Attention: 61 layers x 5 projections, o_proj 1.5, the 6 edge layers 1.5x: 55 x 5.5 + 6 x 8.25 = 352.
    Dense MLPs: layers 0-2 (all edge), gate/up 1.5, down 2.25: 3 x 5.25 = 15.75.
    Shared experts: MoE layers 3-60, of which 58-60 are edge: 55 x 3.5 + 3 x 5.25 = 208.25; routed experts
    the same per layer, times each expert's routing mass (which sums to 1 per layer)."""
    from optimizer.examples.deepseek_v3 import build_deepseek_v3_profile
    from optimizer.model_spec import BlockKind

    profile = build_deepseek_v3_profile()
    arch = profile.architecture
    q4k = np.asarray(profile.sensitivity.values)[:, profile.sensitivity.formats.index("Q4_K")]
    total = {BlockKind.ROUTED_EXPERT: 2.5, BlockKind.ATTENTION: 1.25, BlockKind.SHARED_EXPERT: 0.5,
             BlockKind.DENSE_MLP: 0.25, BlockKind.LM_HEAD: 0.35, BlockKind.EMBEDDING: 0.15}
    for kind, nats in total.items():
        idx = [b for b, blk in enumerate(arch.blocks) if blk.kind is kind]
        assert idx and arch.blocks[idx[0]].quantizable
        assert q4k[idx].sum() == pytest.approx(nats / 256, rel=1e-9), kind
        if kind is not BlockKind.ROUTED_EXPERT:  # a routed expert's share is its routing mass (never 0 here)
            assert (q4k[idx] > 0).all(), kind
    assert np.nansum(q4k) == pytest.approx(5.0 / 256, rel=1e-9)  # uniform Q4_K ~0.02 nats/token, as documented

    def sens(kind, layer, projection, expert=None) -> float:
        (b,) = [b for b, blk in enumerate(arch.blocks) if blk.kind is kind and blk.layer == layer
                and blk.projection == projection and blk.expert == expert]
        return q4k[b]

    assert sens(BlockKind.ATTENTION, 30, "q_a_proj") == pytest.approx(1.25 / 352 / 256, rel=1e-9)
    assert sens(BlockKind.ATTENTION, 0, "o_proj") == pytest.approx(1.25 * 2.25 / 352 / 256, rel=1e-9)
    assert sens(BlockKind.DENSE_MLP, 1, "gate_proj") == pytest.approx(0.25 * 1.5 / 15.75 / 256, rel=1e-9)
    assert sens(BlockKind.SHARED_EXPERT, 30, "down_proj") == pytest.approx(0.5 * 1.5 / 208.25 / 256, rel=1e-9)
    assert sens(BlockKind.SHARED_EXPERT, 60, "up_proj") == pytest.approx(0.5 * 1.5 / 208.25 / 256, rel=1e-9)
    layer = arch.moe_layers.index(next(m for m in arch.moe_layers if m.index == 30))
    mass = profile.experts.routing_mass[layer][7]
    assert sens(BlockKind.ROUTED_EXPERT, 30, "down_proj", 7) == pytest.approx(
        2.5 * 1.5 * mass / 208.25 / 256, rel=1e-9)
    bf16 = np.asarray(profile.sensitivity.values)[:, profile.sensitivity.formats.index("BF16")]
    assert np.nansum(bf16) == 0

def test_explain_a_plan_without_objective(tmp_path, capsys) -> None:
    """Found by the slow fuzz run: `explain` formatted a missing solve.objective with :.6g (TypeError)."""
    import json

    from optimizer.cli import main
    from optimizer.profile import save_profile
    from optimizer.synthetic import synthetic_profile

    save_profile(synthetic_profile(seed=1), tmp_path / "p.json")
    assert main(["solve", str(tmp_path / "p.json"), "--budget", "5MB", "--context", "0", "--overhead", "0",
                 "-o", str(tmp_path / "plan.json")]) == 0
    doc = json.loads((tmp_path / "plan.json").read_text())
    del doc["solve"]["objective"]
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["explain", str(tmp_path / "plan.json")]) == 0
    assert "objective: n/a" in capsys.readouterr().out


def test_llamacpp_target_refuses_runtime_formats_and_names_the_way_out(tmp_path, sizes, capsys) -> None:
    ints = tmp_path / "ints.json"
    save_profile(synthetic_profile(seed=9, formats=("int4_g32", "int8_g32", "BF16"), **ARCH), ints)
    assert main(solve_args(ints, tmp_path / "p.json", "--target", "llamacpp", budget="1TB")) == 2
    assert_one_line_error(capsys, "--target llamacpp: int4_g32, int8_g32 are moecc runtime formats",
                          "python -m profiling run --model DIR --target llamacpp -o profile.json")
    mixed = tmp_path / "mixed.json"
    save_profile(synthetic_profile(seed=9, formats=("int4_g32", "Q4_K", "Q8_0", "BF16"), **ARCH), mixed)
    assert main(solve_args(mixed, tmp_path / "p.json", "--target", "llamacpp", budget="1TB")) == 2
    assert_one_line_error(capsys, "restrict this solve to them with --formats Q4_K,Q8_0,BF16")
    assert main(solve_args(mixed, tmp_path / "p.json", "--target", "llamacpp", "--formats", "Q4_K,Q8_0,BF16",
                           budget="1TB")) == 0
    assert set(load_plan(tmp_path / "p.json").formats.values()) <= {"Q4_K", "Q8_0", "BF16", "F32"}


def test_example_from_a_config_alone_plans_a_model_before_download(tmp_path, capsys) -> None:
    """DeepSeek-V2-Lite's reference config (no weights, no routing statistics): a prior profile that solves."""
    out = tmp_path / "v2lite.json"
    config = ROOT / "optimizer" / "data" / "deepseek_v3" / "config_16B.json"
    assert main(["example", "--config", str(config), "--name", "DeepSeek-V2-Lite", "-o", str(out)]) == 0
    assert "deepseek_v2, 15.71B parameters, 26 MoE layers" in capsys.readouterr().out
    profile = load_profile(out)
    assert profile.model.name == "DeepSeek-V2-Lite" and profile.experts.measurement.prior
    assert all(np.allclose(m, 1 / 64) for m in profile.experts.routing_mass)  # equal shares without --scores
    plan_path = tmp_path / "plan.json"
    assert main(["solve", str(out), "--budget", "8GB", "-o", str(plan_path)]) == 0
    assert load_plan(plan_path).bytes.total <= 8e9
    bad = tmp_path / "scores.json"
    bad.write_text(json.dumps({"layer_1": {"scores": [1.0], "activations": [1.0]}}))
    capsys.readouterr()
    assert main(["example", "--config", str(config), "--scores", str(bad), "-o", str(tmp_path / "x.json")]) == 2
    assert_one_line_error(capsys, "--scores: layer_1 needs 64 nonnegative scores")
    assert main(["example", "--name", "x", "-o", str(tmp_path / "y.json")]) == 2
    assert_one_line_error(capsys, "--scores and --name need --config")
