"""optimizer pareto: the loss-vs-decode-speed frontier (optimizer/pareto.py) and its command."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest

from optimizer.cli import main
from optimizer.errors import InputError
from optimizer.formulation.instance import FormulationOptions
from optimizer.pareto import speed_frontier, write_frontier
from optimizer.plan import Target
from optimizer.profile import device_to_json, save_profile
from tests.optimizer.test_formulation import budget_at, speed_profile


def test_frontier_starts_at_the_lagrangian_optimum_and_every_floor_is_met() -> None:
    from optimizer.formulation.decomposition import lagrangian
    from optimizer.formulation.instance import build_instance

    p = speed_profile()
    budget = budget_at(p, 0.5)
    rows = speed_frontier(p, budget, points=4)
    lr = lagrangian(build_instance(p, budget, FormulationOptions()))
    assert rows[0].floor_tokens_per_s is None and rows[0].bound == pytest.approx(lr.bound, rel=1e-12)
    assert rows[0].gap == pytest.approx(lr.gap, abs=1e-12) and rows[0].proven == (lr.gap <= 1e-4)
    assert len(rows) >= 3
    for r in rows[1:]:
        assert r.tokens_per_s >= r.floor_tokens_per_s * (1 - 1e-9)  # the floor is met under the speed model
        assert r.objective >= r.bound * (1 - 1e-9) and not r.proven
        assert r.weight_bytes <= budget.available
    floors = [r.floor_tokens_per_s for r in rows[1:]]
    assert floors == sorted(floors) and floors[0] > rows[0].tokens_per_s
    assert rows[-1].objective >= rows[0].objective  # faster costs loss


def test_frontier_files_and_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = speed_profile()
    save_profile(p, tmp_path / "profile.json")
    budget = budget_at(p, 0.5)
    args = ["pareto", str(tmp_path / "profile.json"), "--budget", f"{budget.total}B", "--context", "0",
            "--overhead", "0", "--points", "3", "-o", str(tmp_path / "out")]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "objective" in printed and "wrote" in printed
    rows = list(csv.DictReader(open(tmp_path / "out" / "pareto.csv")))
    assert rows == [{k: str(v) if v is not None else "" for k, v in r.items()}
                    for r in json.loads((tmp_path / "out" / "pareto.json").read_text())]
    assert (tmp_path / "out" / "pareto.png").stat().st_size > 0
    assert main([*args[:-2], "--points", "0", "-o", str(tmp_path / "x")]) == 2
    assert "--points: must lie in [1, 100]" in capsys.readouterr().err
    # --device FILE: a device twice as fast in bandwidth and in every format's throughput reads the same bytes
    # per token twice as fast, so the unconstrained optimum (point 0) keeps its plan and doubles its speed
    d = p.device
    twice = replace(d, memory_bandwidth_bytes_per_s=2 * d.memory_bandwidth_bytes_per_s,
                    format_throughput={f: 2 * v for f, v in d.format_throughput.items()})
    (tmp_path / "d.json").write_text(json.dumps(device_to_json(twice)))
    assert main([*args[:-2], "--device", str(tmp_path / "d.json"), "-o", str(tmp_path / "fast")]) == 0
    fast = json.loads((tmp_path / "fast" / "pareto.json").read_text())
    slow = json.loads((tmp_path / "out" / "pareto.json").read_text())
    assert fast[0]["tokens_per_s"] == pytest.approx(2 * slow[0]["tokens_per_s"], rel=1e-9)
    assert fast[0]["objective"] == slow[0]["objective"]


def test_frontier_refuses_what_it_sweeps_itself(tmp_path: Path) -> None:
    p = speed_profile()
    with pytest.raises(InputError, match="--target hf and no --min-tokens-per-s"):
        speed_frontier(p, budget_at(p, 0.5), FormulationOptions(target=Target.LLAMACPP))
    with pytest.raises(InputError, match="--target hf and no --min-tokens-per-s"):
        speed_frontier(p, budget_at(p, 0.5), FormulationOptions(min_tokens_per_s=5.0))
    assert write_frontier(speed_frontier(p, budget_at(p, 0.5), points=1), tmp_path)[0].is_file()
