"""profiling CLI: bad input exits 2 with one line; validate and compare-domains on a tiny model."""
from __future__ import annotations

import json

import pytest

from optimizer.formats import get_format
from optimizer.profile import load_profile
from profiling.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_llamacpp_target_refuses_runtime_formats(capsys, qwen, tmp_path):
    line = _error(capsys, ["run", "--model", str(qwen), "--target", "llamacpp", "--formats", "int4_g32", "Q8_0", "BF16",
                           "-o", str(tmp_path / "p.json")])
    assert "--target llamacpp: int4_g32 are moecc runtime formats" in line and "Q2_K Q3_K Q4_0" in line
    assert not (tmp_path / "p.json").exists()


def test_llamacpp_target_profile_is_solvable_for_llama_cpp(capsys, qwen, tmp_path):
    from optimizer.cli import main as optimizer_main

    out = tmp_path / "p.json"
    assert main(["run", "--model", str(qwen), "--target", "llamacpp", "--measure", "prune", "--max-tokens", "64",
                 "--window", "32", "--no-progress", "-o", str(out)]) == 0
    assert load_profile(out).formats == ("Q4_0", "Q5_0", "Q8_0", "BF16")  # tiny rows admit no K-quant
    assert optimizer_main(["solve", str(out), "--target", "llamacpp", "--budget", "1GB", "--context", "0",
                           "--overhead", "0", "-o", str(tmp_path / "plan.json")]) == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["target"] == "llamacpp" and set(plan["formats"].values()) <= {"Q4_0", "Q5_0", "Q8_0", "BF16", "F32"}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from runtime.tiny_models import make_tiny_model

    return make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("tiny") / "qwen3_moe")


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    return err[0]


def test_not_a_model_directory(capsys, tmp_path):
    assert "config" in _error(capsys, ["run", "--model", str(tmp_path), "-o", str(tmp_path / "p.json")])


def test_not_a_supported_moe(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    assert "unsupported model_type" in _error(capsys, ["run", "--model", str(tmp_path), "-o", str(tmp_path / "p.json")])


def test_empty_corpus(capsys, qwen, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "empty" in _error(capsys, ["run", "--model", str(qwen), "--data", str(empty),
                                      "-o", str(tmp_path / "p.json")])


def test_unknown_corpus(capsys, qwen, tmp_path):
    _error(capsys, ["run", "--model", str(qwen), "--data", "klingon", "-o", str(tmp_path / "p.json")])


@pytest.mark.parametrize("fmt", ["Q4_K", "int4_g128"])
def test_format_the_shapes_cannot_take(capsys, qwen, tmp_path, fmt):
    line = _error(capsys, ["run", "--model", str(qwen), "--formats", fmt, "BF16", "-o", str(tmp_path / "p.json")])
    assert "cannot store any block" in line


def test_format_leaving_a_block_without_storage(capsys, qwen, tmp_path):
    line = _error(capsys, ["run", "--model", str(qwen), "--formats", "int4_g32", "-o", str(tmp_path / "p.json")])
    assert "no candidate format can store block" in line


@pytest.fixture(scope="module")
def profiles(qwen, tmp_path_factory):
    root = tmp_path_factory.mktemp("profiles")
    out = {}
    for corpus in ("english", "code"):
        path = root / f"{corpus}.json"
        assert main(["run", "--model", str(qwen), "--data", f"{corpus}:calibration", "--max-tokens", "128",
                     "--window", "64", "--formats", "int4_g32", "BF16", "--measure", "prune,topk,sensitivity",
                     "--measure-blocks", "8",
                     "--no-progress", "-o", str(path)]) == 0
        out[corpus] = path
    return out


def test_validate_reports_correlations(profiles, qwen, tmp_path, capsys):
    from profiling.validate import validate

    res = validate(profiles["english"], qwen, plans=6, progress=False)
    quantized = [f for f in load_profile(profiles["english"]).formats if get_format(f).quantized]
    assert len(res["rows"]) == 6 + len(quantized) and res["tokens"] == 128
    assert [r["kind"] for r in res["uniform"]] == [f"uniform {f}" for f in quantized]
    assert set(res["correlation_with_uniform"]) == set(res["correlation"])
    for r in res["uniform"]:  # nothing pruned, original k: a uniform plan's measured loss is quantization only
        assert r["measured_kl"] >= 0 and r["predicted_profile"] >= 0
    assert len(validate(profiles["english"], qwen, plans=3, progress=False, uniform=False)["rows"]) == 3
    assert {"profile", "imatrix_kl_fit", "routing_mass", "measured_kl", "measured_nll_raw"} <= set(res["correlation"])
    for row in res["rows"]:
        assert set(row["predicted"]) == set(res["correlation"])
    assert main(["validate", str(profiles["english"]), "--model", str(qwen), "--plans", "3", "--no-progress",
                 "--json", str(tmp_path / "v.json")]) == 0
    assert "Spearman" in capsys.readouterr().out
    assert json.loads((tmp_path / "v.json").read_text())["plans"] == 3


def test_inspect(profiles, capsys):
    assert main(["inspect", str(profiles["english"])]) == 0
    out = capsys.readouterr().out
    assert "kl_vs_imatrix" in out and "prune_cost_vs_saliency" in out


def test_compare_domains(profiles, capsys):
    from profiling.domains import compare_domains

    same = compare_domains(profiles["english"], profiles["english"])
    assert all(m["mean_jaccard"] == 1.0 for m in same["measures"].values())
    diff = compare_domains(profiles["english"], profiles["code"], keep=0.5)
    assert {"frequency", "routing_mass", "saliency", "prune_cost"} <= set(diff["measures"])
    assert all(0.0 <= m["mean_jaccard"] <= 1.0 for m in diff["measures"].values())
    assert main(["compare-domains", str(profiles["english"]), str(profiles["code"])]) == 0
    assert "Jaccard" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "olmoe", "glm4_moe", "dots1", "flex_olmo", "glm4_moe_lite",
                                    "solar_open"])
def test_other_families_streamed(tmp_path, family):
    """Every supported family profiles identically in memory and streamed."""
    import numpy as np

    from profiling.run import RunOptions, run_profile
    from runtime.tiny_models import make_tiny_model

    model = make_tiny_model(family, tmp_path / family)
    res = [run_profile(RunOptions(model=model, max_tokens=128, window=64, formats=["int4_g32", "BF16"],
                                  output=tmp_path / f"{s}.json", streamed=s, progress=False))
           for s in (False, True)]
    assert np.allclose(res[0].profile.sensitivity.values, res[1].profile.sensitivity.values, equal_nan=True)
    for a, b in zip(res[0].profile.experts.saliency, res[1].profile.experts.saliency):
        assert np.allclose(a, b)


@pytest.mark.slow
def test_memory_command(qwen, capsys):
    assert main(["memory", "--model", str(qwen), "--max-tokens", "128"]) == 0
    assert "streamed" in capsys.readouterr().out


def test_device_measures_this_machine_and_replaces_only_the_device_section(capsys, tmp_path):
    from dataclasses import replace

    from optimizer.profile import save_profile
    from optimizer.synthetic import synthetic_profile

    src = synthetic_profile(seed=3, formats=("int4_g32", "Q8_0", "BF16"), num_layers=2, num_experts=4, top_k=2,
                            hidden=64, expert_inter=64, dense_inter=64, vocab=64)
    save_profile(src, tmp_path / "p.json")
    assert main(["device", "--repeats", "1", "--profile", str(tmp_path / "p.json"), "-o", str(tmp_path / "q.json"),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert set(printed["format_throughput"]) == {"int4_g32", "Q8_0", "BF16"}  # the profile's candidates
    assert printed["memory_bandwidth_bytes_per_s"] > 0 and "1024x4096" in printed["method"]
    out = load_profile(tmp_path / "q.json")
    assert out.device.memory_bandwidth_bytes_per_s == printed["memory_bandwidth_bytes_per_s"]
    assert out.device.format_throughput == printed["format_throughput"]
    assert replace(out, device=src.device).to_json() == src.to_json()  # nothing else changed


def test_device_refusals(capsys, tmp_path):
    assert "unknown format 'int9'" in _error(capsys, ["device", "--formats", "int9"])
    assert "--profile needs -o" in _error(capsys, ["device", "--profile", str(tmp_path / "p.json")])


def test_device_file_is_what_optimizer_solve_device_reads(capsys, tmp_path):
    from optimizer.devices import load_device

    assert main(["device", "--repeats", "1", "--formats", "int4_g32", "BF16", "-o", str(tmp_path / "d.json"),
                 "--json"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    device = load_device(str(tmp_path / "d.json"))
    assert device.memory_bandwidth_bytes_per_s == printed["memory_bandwidth_bytes_per_s"]
    assert device.format_throughput == printed["format_throughput"]
    assert not device.measurement.prior
    assert "--repeats" in _error(capsys, ["device", "--repeats", "0"])


def test_gguf_columns_borrow_the_cheapest_int_cost_of_the_same_bits(capsys, tmp_path):
    import numpy as np

    from optimizer.profile import Sensitivity, save_profile, with_costs
    from optimizer.synthetic import synthetic_profile

    # rows of 64 (hidden) and 32 (expert width): the K-quants (blocks of 256) admit none, Q5_0 has no int5 cost
    # to borrow, so Q4_0 and Q8_0 are the GGUF columns; Q4_0 takes min(int4_g32, int4_g64) per block
    src = synthetic_profile(seed=4, formats=("int4_g32", "int4_g64", "int8_g32", "BF16"), num_layers=2,
                            num_experts=4, top_k=2, hidden=64, expert_inter=32, dense_inter=32, vocab=64)
    v = src.sensitivity.values.copy()
    v[:, 1] = np.where(np.isnan(v[:, 1]), np.nan, v[:, 0] * 0.5)  # int4_g64 cheaper where it stores the block
    src = with_costs(src, sensitivity=Sensitivity(src.sensitivity.formats, v, src.sensitivity.measurement))
    save_profile(src, tmp_path / "int.json")
    assert main(["gguf-columns", str(tmp_path / "int.json"), "-o", str(tmp_path / "gguf.json")]) == 0
    assert "GGUF columns are proxies" in capsys.readouterr().out
    out = load_profile(tmp_path / "gguf.json")
    v = load_profile(tmp_path / "int.json").sensitivity.values  # as stored (JSON rounds the floats)
    assert out.formats == ("Q4_0", "Q8_0", "BF16")
    col = {f: out.sensitivity.values[:, j] for j, f in enumerate(out.sensitivity.formats)}
    want_q4 = np.fmin(v[:, 0], v[:, 1])
    quant = np.array([b.quantizable for b in src.architecture.blocks])
    assert np.array_equal(col["Q4_0"][quant], want_q4[quant])
    assert np.array_equal(col["Q8_0"][quant], v[quant, 2]) and np.array_equal(col["BF16"], v[:, 3], equal_nan=True)
    assert "PROXIES" in out.sensitivity.measurement.method and out.prediction is None
