"""experiments: cells, the sweep runner (local and Ray executors), resume, the CLI."""
from __future__ import annotations

from pathlib import Path

import pytest

from experiments.__main__ import load_sweep, main
from experiments.cell import cached_profile, formulation_for, run_cell, solve_cell
from experiments.runner import CELLS_FILE, read_rows, run_sweep
from experiments.sweep import Cell, Sweep, grid
from optimizer.errors import InfeasibleError, InputError

ROOT = Path(__file__).resolve().parents[2]
R1 = str(ROOT / "models" / "r1-deepseek-v3-tiny")
R1_PROFILE = str(ROOT / "experiments" / "profiles" / "r1" / "english.json")


def _cell(**kw) -> Cell:
    return Cell(**{"model": R1, "profile": R1_PROFILE, "budget": "4MB", "eval_tokens": 128, "window": 64, **kw})


def test_cell_key_names_every_field_and_methods_are_checked() -> None:
    a, b = _cell(), _cell(eval_tokens=256)
    assert a.key() != b.key() and a.key() == _cell().key()
    with pytest.raises(InputError, match="not one of"):
        _cell(method="magic")
    with pytest.raises(InputError, match="needs a format"):
        _cell(method="uniform")
    with pytest.raises(InputError, match="takes no format"):
        _cell(method="greedy:int4_g64")
    with pytest.raises(InputError, match="unknown cell field"):
        grid(model=R1, profile=R1_PROFILE, budget="4MB", bugdet="5MB")
    assert [c.budget for c in grid(model=R1, profile=R1_PROFILE, budget=("3MB", "4MB"), method="ilp")] == ["3MB", "4MB"]


def test_the_engine_field_keeps_old_keys_and_refuses_what_llama_cpp_ignores() -> None:
    import hashlib
    import json
    from dataclasses import asdict

    # a key as it was computed before `engine` existed: every other field, hashed
    old = {k: v for k, v in asdict(_cell()).items() if k != "engine"}
    text = json.dumps(old, sort_keys=True, separators=(",", ":"))
    assert _cell().key() == hashlib.sha256(text.encode()).hexdigest()[:16]  # committed rows keep their identity
    assert _cell(engine="llamacpp").key() != _cell().key()
    with pytest.raises(InputError, match="cell.engine: 'vllm' is not one of moecc, llamacpp"):
        _cell(engine="vllm")
    with pytest.raises(InputError, match="llama-quantize quantizes the GGUF"):
        _cell(engine="llamacpp", quantizer="hqq")
    with pytest.raises(InputError, match="llama-quantize quantizes the GGUF"):
        _cell(engine="llamacpp", apply=True)


def test_methods_switch_levers_off() -> None:
    """quantize_only keeps every expert and k; prune_only one format and k; topk_only one format and every expert;
    uniform nothing but one format."""
    q = solve_cell(_cell(method="quantize_only"))
    assert all(len(lp.kept_experts) == 32 and lp.top_k == 4 for lp in q.layers) and q.bytes.total <= 4_000_000
    p = solve_cell(_cell(method="prune_only:int4_g64", budget="4MB"))
    assert all(lp.top_k == 4 for lp in p.layers) and sum(len(lp.kept_experts) for lp in p.layers) < 160
    expert_formats = {f for n, f in p.formats.items() if ".experts." in n}
    assert expert_formats == {"int4_g64"}
    t = solve_cell(_cell(method="topk_only:int4_g64", budget="6MB"))  # uniform int4 with all experts: 5.83 MB
    # lowering k saves no weight bytes, so under a memory budget alone the ILP keeps k = 4
    assert all(len(lp.kept_experts) == 32 and lp.top_k == 4 for lp in t.layers)
    assert {f for n, f in t.formats.items() if ".experts." in n} == {"int4_g64"}
    u = solve_cell(_cell(method="uniform:int8_g64", budget="1TB"))
    assert {f for n, f in u.formats.items() if ".experts." in n} == {"int8_g64"}
    with pytest.raises(InfeasibleError):
        solve_cell(_cell(method="uniform:int8_g64"))
    solver, options, _ = formulation_for(_cell(method="no_topk"), cached_profile(R1_PROFILE))
    assert solver == "highs" and options.min_top_k == 4


def test_run_cell_row() -> None:
    row = run_cell(_cell(method="quantize_only"))
    assert row["status"] == "ok" and row["key"] == _cell(method="quantize_only").key()
    assert row["tokens"] == 128 and row["window"] == 64 and row["plan_bytes"] <= 4_000_000
    assert row["kl_mean"] > 0 and 0 < row["top1_agreement"] <= 1 and row["perplexity"] > 1
    assert row["kl_median"] <= row["kl_p99"] <= row["kl_max"]
    miss = run_cell(_cell(method="uniform:int8_g64"))
    assert miss["status"] == "does not fit" and "kl_mean" not in miss


@pytest.fixture(scope="module")
def two_cells() -> Sweep:
    cells = (_cell(method="quantize_only"), _cell(method="uniform:int4_g64", budget="1TB"))
    return Sweep(name="t", cells=cells, smoke=cells[:1])


def test_run_resume_and_refuse(two_cells: Sweep, tmp_path: Path) -> None:
    rows = run_sweep(two_cells, tmp_path, smoke=True, workers=1)
    assert [r["method"] for r in rows] == ["quantize_only"]
    with pytest.raises(InputError, match="--resume"):
        run_sweep(two_cells, tmp_path, workers=1)
    seen = []
    rows = run_sweep(two_cells, tmp_path, resume=True, workers=1, on_row=lambda r, i, n: seen.append(r["method"]))
    assert seen == ["uniform:int4_g64"]  # the finished cell was skipped
    assert [r["method"] for r in rows] == ["quantize_only", "uniform:int4_g64"]
    assert len(read_rows(tmp_path)) == 2 and (tmp_path / "rows.csv").is_file()
    with open(tmp_path / CELLS_FILE, "a") as fh:
        fh.write('{"key": "torn')  # a run killed mid-line
    assert len(read_rows(tmp_path)) == 2


def test_ray_executor_runs_the_same_cells(two_cells: Sweep, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    local = run_sweep(two_cells, tmp_path / "local", smoke=True, workers=1)
    remote = run_sweep(two_cells, tmp_path / "ray", smoke=True, executor="ray", workers=2)
    for a, b in zip(local, remote):
        assert a["key"] == b["key"] and a["plan_sha256"] == b["plan_sha256"]
        assert a["kl_mean"] == pytest.approx(b["kl_mean"], rel=1e-9)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "nonesuch", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("error: SWEEP: unknown sweep")
    assert main(["list"]) == 0 and "smoke" in capsys.readouterr().out
    sweep = load_sweep("smoke")
    assert len(sweep.cells) == 4 and all(c.eval_tokens == 512 for c in sweep.cells)
    spec = tmp_path / "mine.py"
    spec.write_text("from experiments.sweep import Sweep\nSWEEP = 3\n")
    assert main(["run", str(spec)]) == 2 and "defines no SWEEP" in capsys.readouterr().err


def test_smoke_sweep_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What CI runs: the smoke sweep (4 cells on R1, 512 tokens) and its report."""
    assert main(["run", "smoke", "--out", str(tmp_path), "--workers", "1"]) == 0
    rows = read_rows(tmp_path)
    assert len(rows) == 4 and all(r["status"] == "ok" and r["sweep"] == "smoke" for r in rows)
    report = (tmp_path / "report.md").read_text()
    assert "### KL mean / perplexity by budget and method" in report and (tmp_path / "kl_vs_bytes.png").is_file()
