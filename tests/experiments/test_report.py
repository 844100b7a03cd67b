"""experiments.report: report.md and plots from hand-written rows (no model runs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.__main__ import main
from experiments.report import pareto, write_report
from optimizer.errors import InputError

EN = "experiments/profiles/r1/english.json"
CODE = "experiments/profiles/r1/code.json"
CELL = {"model": "models/r1", "profile": EN, "formulation": "predicted_loss", "quantizer": "rtn",
        "eval_corpus": "english", "eval_split": "test", "eval_tokens": 512, "window": None, "apply": False,
        "time_limit": 60.0}


def _row(method: str, budget: str, kl: float | None = None, ppl: float | None = None, plan: int | None = None,
         status: str = "ok", **kw) -> dict:
    row = {**CELL, "method": method, "budget": budget, "key": f"{method}-{budget}-{len(kw)}", "git_sha": "abc123",
           "status": status, **kw}
    if status == "ok":
        row.update(kl_mean=kl, kl_median=kl / 2, kl_p99=kl * 4, kl_p999=kl * 8, kl_max=kl * 10,
                   top1_agreement=round(1 - kl, 4), perplexity=ppl, plan_bytes=plan, window=256, tokens=512,
                   solve_status="optimal", predicted_loss=kw.get("predicted_loss", kl * 10), reference_perplexity=12.5)
    return row


ROWS = [
    # the main protocol (English profile, English corpus); budgets written out of byte order on purpose
    _row("ilp", "12MB", 0.05, 15.0, 11_800_000, predicted_loss=0.2),
    _row("ilp", "4MB", 0.18, 20.0, 3_900_000, predicted_loss=1.5),
    _row("ilp", "4MB", 0.40, 21.0, 3_950_000, formulation="importance", predicted_loss=7.0),
    _row("ilp", "12MB", 0.04, 14.8, 11_900_000, formulation="importance", predicted_loss=2.0),
    _row("quantize_only", "4MB", status="does not fit", message="needs 4.2 MB"),
    _row("quantize_only", "12MB", 0.10, 16.0, 11_990_000),
    _row("prune_only:BF16", "12MB", 0.12, 16.5, 11_000_000),
    _row("no_topk", "12MB", 0.08, 15.5, 11_700_000),
    _row("greedy", "4MB", 0.15, 20.5, 3_800_000),
    _row("greedy", "12MB", status="error: RuntimeError: boom"),
    _row("uniform:int4_g64", "1TB", 0.20, 19.0, 5_000_000),
    _row("uniform:int8_g64", "1TB", 0.03, 14.0, 10_000_000),
    # calibration shift: the ILP from the code profile, and on the code corpus
    _row("ilp", "4MB", 0.35, 23.0, 3_900_000, profile=CODE),
    _row("ilp", "4MB", 0.50, 40.0, 3_900_000, eval_corpus="code"),
    _row("ilp", "4MB", 0.22, 30.0, 3_900_000, profile=CODE, eval_corpus="code"),
]


def _results(tmp_path: Path, rows: list = ROWS, name: str = "r1-smoke") -> Path:
    out = tmp_path / name
    out.mkdir()
    (out / "cells.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def _section(text: str, title: str) -> str:
    """The lines under ``### TITLE`` up to the next heading."""
    return text.split(f"### {title}", 1)[1].split("\n#", 1)[0]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, str]:
    out = _results(tmp_path_factory.mktemp("report"))
    path = write_report(out)
    return out, path.read_text(encoding="utf-8")


def test_header_counts_protocol_and_reproduce(report) -> None:
    out, text = report
    assert text.startswith("# Sweep report: r1\n")
    assert f"- Results: `{out}` (15 cells: 13 ok, 1 does not fit, 1 failed)" in text
    assert "- Git commits: `abc123` (15 cells)" in text
    assert (f"- Reproduce: `python -m experiments run r1 --smoke --out {out} --resume`, "
            f"then `python -m experiments report {out}`") in text
    assert ("- Main tables: profile `experiments/profiles/r1/english.json`, corpus `english`, split `test`, "
            "512 tokens, window 256, quantizer `rtn`, in memory\n"
            "- The original's perplexity on the same tokens: 12.50\n") in text


def test_main_table_sorts_budgets_by_bytes_and_bolds_the_best_kl(report) -> None:
    table = _section(report[1], "KL mean / perplexity by budget and method")
    assert ("| budget | ilp (predicted_loss) | ilp (importance) | quantize_only | prune_only:BF16 | no_topk | greedy |"
            in table)
    lines = [line for line in table.splitlines() if line.startswith(("| 4MB", "| 12MB"))]
    assert lines == [  # 4MB before 12MB (by bytes, not by text); greedy 0.15 < ilp 0.18 at 4MB, importance at 12MB
        "| 4MB | 0.18 / 20.00 | 0.4 / 21.00 | does not fit | - | - | **0.15 / 20.50** |",
        "| 12MB | 0.05 / 15.00 | **0.04 / 14.80** | 0.1 / 16.00 | 0.12 / 16.50 | 0.08 / 15.50 | error |",
    ]
    uniform = _section(report[1], "Uniform formats")
    assert "| int4_g64 | 5000000 | 5.000 | 0.2 | 0.1 | 0.8 | 0.8 | 19.00 |" in uniform
    assert "| int8_g64 | 10000000 | 10.000 | 0.03 | 0.015 | 0.12 | 0.97 | 14.00 |" in uniform


def test_plots_are_linked_written_and_reproducible(report, tmp_path) -> None:
    out, text = report
    for name in ("kl_vs_bytes.png", "ppl_vs_bytes.png"):
        assert f"]({name})" in text
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    again = _results(tmp_path)
    write_report(again)
    assert (again / "kl_vs_bytes.png").read_bytes() == (out / "kl_vs_bytes.png").read_bytes()
    assert (again / "report.md").read_text() == text.replace(str(out), str(again))


def test_pareto_front(report) -> None:
    assert pareto([(1, 5, "a"), (2, 3, "b"), (2, 4, "c"), (3, 3, "d"), (4, 1, "e")]) == [(1, 5, "a"), (2, 3, "b"),
                                                                                          (4, 1, "e")]
    front = _section(report[1], "Pareto front")
    assert "| ilp (predicted_loss) | 4MB (3.900 MB, KL 0.18), 12MB (11.800 MB, KL 0.05) |" in front
    assert "| uniform | int4_g64 (5.000 MB, KL 0.2), int8_g64 (10.000 MB, KL 0.03) |" in front
    # all methods: greedy (3.8 MB, 0.15) and uniform int8 (10 MB, 0.03) dominate every other point
    assert front.split("All methods together:")[1].strip().splitlines()[2:] == [
        "| 3.800 | 0.15 | greedy @ 4MB |", "| 10.000 | 0.03 | uniform:int8_g64 |"]


def test_formulation_table(report) -> None:
    table = _section(report[1], "ILP formulations at equal budgets")
    assert table.strip().splitlines()[-4:] == [
        "| 4MB | predicted_loss | 3.900 | **0.18** | 20.00 | 1.5 | optimal |",
        "| 4MB | importance | 3.950 | 0.4 | 21.00 | 7 | optimal |",
        "| 12MB | predicted_loss | 11.800 | 0.05 | 15.00 | 0.2 | optimal |",
        "| 12MB | importance | 11.900 | **0.04** | 14.80 | 2 | optimal |",
    ]


def test_ablation_table(report) -> None:
    table = _section(report[1], "Ablations")
    assert ("| budget | quantize_only (mixed precision alone) | prune_only:BF16 (pruning alone) | no_topk (pruning + "
            "mixed precision) | ilp (predicted_loss) (all three) | greedy (baseline) | top-k buys (no_topk / ilp "
            "(predicted_loss)) | pruning buys (quantize_only / no_topk) | mixed precision buys (prune_only:BF16 / "
            "no_topk) |") in table
    # at 12MB: top-k 0.08 / 0.05 = 1.60, pruning 0.10 / 0.08 = 1.25, mixed precision 0.12 / 0.08 = 1.50
    assert "| 4MB | does not fit | - | - | 0.18 | 0.15 | - | - | - |" in table
    assert "| 12MB | 0.1 | 0.12 | 0.08 | 0.05 | error | 1.60x | 1.25x | 1.50x |" in table


def test_headline_ratio_never_and_who_wins(report) -> None:
    table = _section(report[1], "Headline")
    # int4 (5.0 MB, KL 0.20, ppl 19): in KL the 4MB ILP plan (0.18 <= 0.20) at 3.9 MB: 3_900_000 / 5_000_000 = 0.780;
    # in perplexity 4MB (20.0) is worse, 12MB (15.0) is not: 11_800_000 / 5_000_000 = 2.360.
    assert "| int4_g64 | 5.000 | 4MB | 3.900 | 0.780 | 12MB | 11.800 | 2.360 |" in table
    # int8 (KL 0.03, ppl 14): no ILP plan (KL >= 0.05, ppl >= 15) is as good
    assert "| int8_g64 | 10.000 | never | - | - | never | - | - |" in table
    assert "- 4MB: loses in KL mean (0.18) to greedy (0.15)\n" in table
    # uniform int8 (10 MB) fits 12MB and beats it, as does the importance formulation
    assert ("- 12MB: loses in KL mean (0.05) to uniform:int8_g64 (0.03), ilp (importance) (0.04); in perplexity "
            "(15.00) to uniform:int8_g64 (14.00), ilp (importance) (14.80)\n") in table


def test_calibration_shift_and_failures(report) -> None:
    table = _section(report[1], "Calibration shift")
    assert "| budget | code -> code | code -> english | english -> code | english -> english |" in table
    assert "| 4MB | 0.22 / 30.00 | 0.35 / 23.00 | 0.5 / 40.00 | 0.18 / 20.00 |" in table
    assert "| 12MB | - | - | - | 0.05 / 15.00 |" in table
    failed = _section(report[1], "Failed cells")
    assert "| greedy | 12MB | experiments/profiles/r1/english.json | english | error: RuntimeError: boom |" in failed


def test_no_shift_section_without_shift_rows(tmp_path) -> None:
    out = _results(tmp_path, ROWS[:12], name="r1")
    text = write_report(out).read_text()
    assert "Calibration shift" not in text and "- Reproduce: `python -m experiments run r1 --out" in text


def test_cli_output_elsewhere_and_several_models(tmp_path, capsys) -> None:
    rows = ROWS[:12] + [{**r, "model": "models/r2", "key": r["key"] + "-r2"} for r in ROWS[:3]]
    out = _results(tmp_path, rows)
    target = tmp_path / "elsewhere" / "r.md"
    assert main(["report", str(out), "-o", str(target)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {target}"
    text = target.read_text()
    assert "## models/r1" in text and "## models/r2" in text
    for name in ("kl_vs_bytes-r1.png", "ppl_vs_bytes-r1.png", "kl_vs_bytes-r2.png", "ppl_vs_bytes-r2.png"):
        assert (target.parent / name).stat().st_size > 0 and f"]({name})" in text


@pytest.mark.parametrize("content, match", [
    (None, "no results in"),
    ("", "holds no JSON row"),
    ("not json\n", "holds no JSON row"),
    ("[1, 2]\n", "row 1: expected a JSON object"),
    (json.dumps({"model": "m", "budget": "4MB", "status": "ok"}) + "\n", "row 1: missing or non-text field 'method'"),
    (json.dumps(_row("ilp", "4MB", 0.1, 2.0, None)) + "\n", "row 1: an ok row needs a number in 'plan_bytes'"),
    (json.dumps(_row("ilp", "4 parsecs", 0.1, 2.0, 5)) + "\n", "budget"),
])
def test_bad_input_raises(tmp_path, content, match) -> None:
    if content is not None:
        (tmp_path / "cells.jsonl").write_text(content)
    with pytest.raises(InputError, match=match):
        write_report(tmp_path)
    with pytest.raises(InputError, match="no such directory"):
        write_report(tmp_path / "missing")
    assert main(["report", str(tmp_path)]) == 2


def test_what_refine_handed_over_and_headline_uses_it(tmp_path) -> None:
    """refine at 4MB evaluates to greedy's KL bit for bit (the same plan); at 12MB to nobody's (its own round).
    The headline then follows refine: int8 (KL 0.03) is matched at 12MB by refine's 0.02: 11.9 / 10.0 = 1.190."""
    rows = ROWS + [_row("refine", "4MB", 0.15, 20.5, 3_800_000), _row("refine", "12MB", 0.02, 14.5, 11_900_000),
                   _row("refine", "8MB", 0.20, 19.0, 5_000_000)]  # uniform int4's plan (same KL)
    text = write_report(_results(tmp_path, rows)).read_text(encoding="utf-8")
    handed = _section(text, "What refine handed over")
    assert "| 4MB | greedy |" in handed and "| 12MB | its own (a corrected-profile round) |" in handed
    assert "| 8MB | uniform:int4_g64 |" in handed
    assert "1 of 3 budgets got a plan no other method found" in handed
    headline = _section(text, "Headline: the smallest budget whose `refine` plan matches a uniform format")
    assert "| int8_g64 | 10.000 | 12MB | 11.900 | 1.190 |" in headline
