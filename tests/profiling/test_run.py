"""profiling.run on the tiny random models: the profile loads, solves, and its numbers add up."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from optimizer.budget import make_budget
from optimizer.formats import get_format
from optimizer.formulation.instance import FormulationOptions
from optimizer.profile import load_profile
from optimizer.solve import optimize

FORMATS = {"qwen3_moe": ["int4_g32", "BF16"], "deepseek_v3": ["int4_g32", "int8_g32", "BF16"]}
MEASURE_BLOCKS = {"qwen3_moe": None, "deepseek_v3": 12}  # None: every block



pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from runtime.tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_model(f, root / f) for f in ("qwen3_moe", "deepseek_v3")}


def _run(model, out, **kw):
    from profiling.run import RunOptions, run_profile

    opts = dict(model=model, max_tokens=128, window=64, formats=["int4_g32", "BF16"], output=out,
                measure=["prune", "topk", "sensitivity"], progress=False)
    opts.update(kw)
    return run_profile(RunOptions(**opts))


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("profiles")
    return {f: _run(d, root / f"{f}.json", formats=FORMATS[f], measure_blocks=MEASURE_BLOCKS[f])
            for f, d in tiny.items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_profile_loads_and_solves(runs, family):
    res = runs[family]
    p = load_profile(res.profile_path)
    assert p.hash == res.details["profile_hash"]
    assert p.formats == tuple(get_format(f).name for f in FORMATS[family])
    for m in (p.experts.measurement, p.experts.prune_cost_measurement, p.sensitivity.measurement,
              p.topk_cost.measurement):
        assert m.method and m.tokens == 128 and m.seed == 0 and not m.prior
    full = sum(get_format("BF16").nbytes(b.shape) for b in p.architecture.blocks)
    for objective in ("predicted_loss", "importance", "saliency"):
        plan = optimize(p, make_budget(p.architecture, int(full * 0.7), context=0, overhead=0),
                        FormulationOptions(objective=objective))
        assert plan.solve.status.value in ("optimal", "feasible")


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_expert_stats_sum(runs, family):
    p = load_profile(runs[family].profile_path)
    for i, m in enumerate(p.architecture.moe_layers):
        f = np.asarray(p.experts.frequency[i])
        assert f.sum() == pytest.approx(1.0, abs=1e-6)
        assert np.asarray(p.experts.routing_mass[i]).sum() == pytest.approx(1.0, abs=1e-6)
        picks = f * 128 * m.top_k  # frequency = picks / (tokens x top_k)
        assert np.allclose(picks, np.round(picks), atol=1e-4)
        assert np.all(np.asarray(p.experts.saliency[i]) >= 0)
        score = np.asarray(p.experts.mean_score[i])
        assert np.all((score >= 0) & (score <= 1.0 + 1e-6))
        assert np.all(np.isfinite(p.experts.prune_cost[i])) and np.all(p.experts.prune_cost[i] >= 0)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_topk_cost_zero_at_k_and_decreasing(runs, family):
    p = load_profile(runs[family].profile_path)
    rows = [np.asarray(v) for v in p.topk_cost.values]
    for row in rows:
        assert row[-1] == 0.0 and np.all(row >= 0)
    mean = np.mean(np.stack(rows), axis=0)  # tiny models: the same top_k in every layer
    assert np.all(np.diff(mean) <= 1e-12)


def test_sensitivity_table_matches_details(runs):
    res = runs["qwen3_moe"]
    p, d = load_profile(res.profile_path), res.details
    assert set(d["measured_blocks"]) == set(d["blocks"])  # small model: every block measured
    for i, b in enumerate(p.architecture.blocks):
        row = p.sensitivity.values[i]
        if not b.quantizable:
            assert np.all(np.isnan(row))
            continue
        for j, f in enumerate(p.sensitivity.formats):
            if not get_format(f).admits(b.shape):
                assert np.isnan(row[j])  # e.g. 16-element expert down_proj rows in int4_g32
            else:
                assert row[j] == pytest.approx(d["measured_kl"][b.name][f], rel=1e-5, abs=1e-9)  # --cost kl
                assert d["proxy_raw"][b.name][f] >= 0
    assert d["proxy_fit"]["global_scale"] > 0


def test_cost_nll_stores_clipped_nll(tiny, tmp_path):
    res = _run(tiny["qwen3_moe"], tmp_path / "n.json", measure=["prune", "sensitivity"], cost="nll")
    d, p = res.details, res.profile
    col = {f: j for j, f in enumerate(p.sensitivity.formats)}
    for name, row in d["measured_nll"].items():
        for f, v in row.items():
            assert p.sensitivity.values[d["block_index"][name], col[f]] == pytest.approx(max(0.0, v), abs=1e-9)
    for i, row in enumerate(d["prune_nll"]):
        assert np.allclose(p.experts.prune_cost[i], np.maximum(row, 0.0), atol=1e-9)
    assert "clipped at 0" in p.sensitivity.measurement.method


def test_details_side_file(runs):
    res = runs["deepseek_v3"]
    assert res.details_path.name == "deepseek_v3.details.json"
    d = json.loads(res.details_path.read_text())
    for key in ("proxy_raw", "proxy_fitted", "measured_nll", "measured_kl", "prune_nll", "topk_kl", "timings_s",
                "peak_rss_bytes"):
        assert key in d
    assert d["peak_rss_bytes"] > 0
    # one reference-pass timing per decoder layer, every phase measured (non-negative, nothing missing)
    assert len(d["reference_layer_s"]) == 3
    assert all(set(t) == {"load", "forward", "statistics", "unload"} and min(t.values()) >= 0
               for t in d["reference_layer_s"])
    assert d["reference_head_s"] > 0
    # sampled model: 12 measured blocks, the other cells hold the fitted proxy
    assert len(d["measured_blocks"]) == 12
    p = load_profile(res.profile_path)
    col = {f: j for j, f in enumerate(p.sensitivity.formats)}
    for name in set(d["blocks"]) - set(d["measured_blocks"]):
        for f, v in d["proxy_fitted"][name].items():
            assert p.sensitivity.values[d["block_index"][name], col[f]] == pytest.approx(v, rel=1e-5, abs=1e-12)


def test_engine_matches_full_forward(tiny):
    """The layer-by-layer engine reproduces the model's own loss, with and without a perturbation."""
    from profiling.engine import Engine, Perturbation
    from profiling.model_io import Runner, load_text, token_windows
    from runtime.evaluate import tokenize
    from runtime.moe import mask_experts

    model_dir = tiny["deepseek_v3"]
    inputs, targets = token_windows(tokenize(model_dir, load_text("english")[0]), 128, 64)
    runner = Runner(model_dir)
    engine = Engine(runner, inputs, targets, batch_size=1, progress=False)
    engine.reference()

    def loss():
        logits = runner.model(input_ids=inputs).logits
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).item()

    with torch.no_grad():
        base = loss()
        assert engine.ref_nll == pytest.approx(base, abs=1e-5)
        eff = engine.evaluate([Perturbation("p", 2, lambda: mask_experts(runner.model, {2: [3]}))])["p"]
        with mask_experts(runner.model, {2: [3]}):
            assert eff.dnll == pytest.approx(loss() - base, abs=1e-5)
        assert engine.evaluate_full().dnll == pytest.approx(0.0, abs=1e-6)
        perts = [Perturbation(e, 1, lambda e=e: mask_experts(runner.model, {1: [e]})) for e in range(4)]
        big = engine.evaluate(perts)
        engine.state_budget_bytes = 1  # one perturbation per chunk
        assert engine.evaluate(perts) == big


def test_streamed_matches_in_memory(tiny, tmp_path):
    a = _run(tiny["deepseek_v3"], tmp_path / "a.json", measure=["topk"])
    b = _run(tiny["deepseek_v3"], tmp_path / "b.json", measure=["topk"], streamed=True)
    for x, y in zip(a.profile.experts.routing_mass, b.profile.experts.routing_mass):
        assert np.allclose(x, y, atol=1e-6)
    for x, y in zip(a.profile.topk_cost.values, b.profile.topk_cost.values):
        assert np.allclose(x, y, atol=1e-6)
    assert np.allclose(a.profile.sensitivity.values, b.profile.sensitivity.values, equal_nan=True, rtol=1e-5)
    assert b.details["streamed"] and b.details["reference_nll"] == pytest.approx(a.details["reference_nll"], abs=1e-6)


def test_default_formats_fit_the_model(tiny):
    from optimizer.architectures import load_architecture
    from profiling.run import default_formats

    # rows of 32 and 64 take g32; the routed experts' down_proj rows of 16 take the same bits in g16
    assert default_formats(load_architecture(tiny["qwen3_moe"])) == [
        "int2_g32", "int3_g32", "int4_g32", "int5_g32", "int6_g32", "int8_g32",
        "int2_g16", "int3_g16", "int4_g16", "int5_g16", "int6_g16", "int8_g16", "BF16"]


# 144 = 2 x 72, and 144 itself is over 128; 136 = 8 x 17: its multiples of 8 are 8 and 136 (> 128); 20 and 7 have
# no multiple of 8 at all
@pytest.mark.parametrize("row_len, group", [(80, 80), (40, 40), (96, 96), (144, 72), (136, 8), (256, 128),
                                            (20, None), (7, None)])
def test_stand_in_group_is_the_largest_multiple_of_8_up_to_128_dividing_the_row(row_len, group):
    from optimizer.formats import stand_in_group

    assert stand_in_group(row_len) == group


def test_llamacpp_target_defaults_to_the_gguf_types_the_rows_admit(tiny, tmp_path):
    from optimizer.architectures import load_architecture
    from profiling.model_io import ProfilingError
    from profiling.run import default_formats
    from runtime.tiny_models import tiny_config

    # tiny rows are 16 (expert down_proj), 32 and 64 elements: Q4_0/Q5_0/Q8_0 (blocks of 32) store some blocks,
    # the K-quants (256) none, so they are dropped
    assert default_formats(load_architecture(tiny["qwen3_moe"]), "llamacpp") == ["Q4_0", "Q5_0", "Q8_0", "BF16"]
    config = tiny_config("qwen3_moe")
    config.hidden_size = 256  # rows of 256 (every projection's input): the K-quants store those blocks
    config.save_pretrained(tmp_path / "wide")
    assert default_formats(load_architecture(tmp_path / "wide"), "llamacpp") == [
        "Q2_K", "Q3_K", "Q4_0", "Q5_0", "Q6_K", "Q8_0", "BF16"]
    with pytest.raises(ProfilingError, match="--target vllm: expected one of hf, llamacpp"):
        default_formats(load_architecture(tiny["qwen3_moe"]), "vllm")


def test_device_throughput_numbers():
    from profiling.device import format_throughput, memory_bandwidth, peak_rss_bytes

    assert memory_bandwidth(mib=4, repeats=1) > 0
    tp = format_throughput(["int4_g32", "Q8_0", "BF16"], rows=32, cols=256, repeats=1)
    assert set(tp) == {"int4_g32", "Q8_0", "BF16"} and all(v > 0 for v in tp.values())
    assert peak_rss_bytes() > 0


def test_token_windows_and_data_spec(tmp_path):
    from profiling.model_io import ProfilingError, parse_data, token_windows

    x, y = token_windows(list(range(10)), max_tokens=100, window=4)
    assert x.shape == (2, 4) and y[0].tolist() == [1, 2, 3, 4]
    x, y = token_windows(list(range(5)), max_tokens=100, window=64)  # shorter than a window: one window
    assert x.shape == (1, 4)
    assert parse_data("code") == ("code", "calibration") and parse_data("english/test") == ("english", "test")
    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert parse_data(str(text)) == (str(text), "file")
    with pytest.raises(ProfilingError):
        token_windows([1], max_tokens=10, window=4)


class _Interrupted(Exception):
    pass


def test_interrupted_run_resumes_to_the_same_profile(tiny, tmp_path, monkeypatch):
    """Kill a run after 10 measured effects, resume it: only the rest is measured, and the profile equals an
    uninterrupted run's (effects are deterministic and the journal stores them exactly)."""
    from profiling.journal import Journal, journal_path
    from profiling.model_io import ProfilingError

    original = Journal.record
    calls = {"n": 0, "die_at": None}

    def record(self, *args):
        original(self, *args)
        calls["n"] += 1
        if calls["n"] == calls["die_at"]:
            raise _Interrupted

    monkeypatch.setattr(Journal, "record", record)
    d = tiny["qwen3_moe"]
    full = _run(d, tmp_path / "full.json")
    total = calls["n"]
    assert total > 20 and not journal_path(tmp_path / "full.json").exists()  # deleted once the profile is written

    calls.update(n=0, die_at=10)
    with pytest.raises(_Interrupted):
        _run(d, tmp_path / "p.json")
    journal = journal_path(tmp_path / "p.json")
    assert journal.is_file() and not (tmp_path / "p.json").exists()

    calls.update(n=0, die_at=None)
    with pytest.raises(ProfilingError, match="other settings"):  # a different run cannot reuse it
        _run(d, tmp_path / "p.json", seed=1, resume=True)
    resumed = _run(d, tmp_path / "p.json", resume=True)
    assert calls["n"] == total - 10  # only what the interrupted run had not measured
    assert np.array_equal(resumed.profile.sensitivity.values, full.profile.sensitivity.values, equal_nan=True)
    for x, y in zip(resumed.profile.topk_cost.values, full.profile.topk_cost.values):
        assert list(x) == list(y)
    assert resumed.details["prune_kl"] == full.details["prune_kl"]
    assert resumed.details["measured_kl"] == full.details["measured_kl"]
    assert not journal.exists()
    with pytest.raises(ProfilingError, match="no journal"):
        _run(d, tmp_path / "p.json", resume=True)


def test_refit_restores_fitted_cells_and_keeps_measured_ones(runs, tmp_path):
    """A profile whose proxy cells were filled by another rule (here: zeroed) gets them back from its details
    file; measured cells, other sections and the contract are untouched; refitting a fresh profile is a no-op."""
    import dataclasses
    import shutil

    from optimizer.profile import save_profile
    from profiling.cli import main
    from profiling.refit import refit
    from profiling.run import details_path

    res = runs["deepseek_v3"]
    src = tmp_path / "p.json"
    shutil.copy(res.profile_path, src)
    shutil.copy(res.details_path, details_path(src))
    prof = load_profile(src)
    measured = set(res.details["measured_blocks"])
    index = res.details["block_index"]
    unmeasured_rows = [i for n, i in index.items() if n not in measured]
    measured_rows = [index[n] for n in measured]
    assert unmeasured_rows and measured_rows
    damaged = np.array(prof.sensitivity.values, copy=True)
    damaged[unmeasured_rows] = np.where(np.isfinite(damaged[unmeasured_rows]), 0.0, np.nan)
    save_profile(dataclasses.replace(prof, sensitivity=dataclasses.replace(prof.sensitivity, values=damaged)), src)

    original = load_profile(res.profile_path).sensitivity.values  # as written (the contract rounds floats)
    _, details, out = refit(src, tmp_path / "fixed.json")
    fixed = load_profile(out)
    assert np.array_equal(fixed.sensitivity.values, original, equal_nan=True)
    assert details["refit"]["cells_changed"] > 0
    assert fixed.topk_cost.values[0].tolist() == load_profile(res.profile_path).topk_cost.values[0].tolist()
    assert "scaled into nats per" in fixed.sensitivity.measurement.method

    assert main(["refit", str(out)]) == 0  # in place, already current: nothing changes
    assert json.loads(details_path(out).read_text())["refit"]["cells_changed"] == 0
    assert np.array_equal(load_profile(out).sensitivity.values, original, equal_nan=True)
    details_path(src).unlink()
    assert main(["refit", str(src)]) == 2  # no details file: one line, exit 2


def test_refit_proxy_only_with_group_rule(runs, tmp_path):
    """--proxy-only --rule group: every admissible cell is raw proxy x its group's scale, measured ones too."""
    import shutil

    from profiling.refit import refit
    from profiling.run import details_path

    res = runs["deepseek_v3"]
    src = tmp_path / "p.json"
    shutil.copy(res.profile_path, src)
    shutil.copy(res.details_path, details_path(src))
    _, details, out = refit(src, tmp_path / "q.json", rule="group", proxy_only=True)
    prof = load_profile(out)
    scales = details["proxy_fit"]["scales"]
    assert details["proxy_fit"]["format_scales"] == {} and details["refit"]["proxy_only"]
    formats = list(prof.sensitivity.formats)
    checked = 0
    for name, row in details["proxy_raw"].items():
        i = details["block_index"][name]
        for f, raw in row.items():
            cell = prof.sensitivity.values[i, formats.index(f)]
            if np.isfinite(cell):
                assert cell == pytest.approx(raw * scales[details["groups"][name]], rel=1e-5)
                checked += name in details["measured_blocks"]
    assert checked > 0  # measured blocks were replaced too
    assert "measured ones too" in prof.sensitivity.measurement.method
    with pytest.raises(Exception, match="rule"):
        refit(src, tmp_path / "r.json", rule="per_block")


def test_format_throughput_times_a_group_that_does_not_divide_the_columns():
    """int3_g80 cannot store rows of 4096 (4096 = 51 x 80 + 16): it is timed on the first 4080 columns, and a
    profile with such a candidate gets its device section instead of failing at the end."""
    from profiling.device import format_throughput

    out = format_throughput(["int3_g80", "int3_g64"], rows=8, cols=4096, repeats=1)
    assert set(out) == {"int3_g80", "int3_g64"} and all(v > 0 for v in out.values())
