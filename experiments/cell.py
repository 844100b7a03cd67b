"""One sweep cell, end to end: solve, compress, evaluate against the original; returns a tidy row.

    row = run_cell(Cell(model="models/r1-deepseek-v3-tiny", profile="experiments/profiles/r1/english.json",
                        budget="4MB", method="ilp"))

The budget is the weights' (no KV-cache or overhead reserve). The plan is compressed into the original in
memory (:func:`runtime.inmemory.compress_in_memory`, equal to ``runtime apply`` + ``runtime.load``, tested), or
written and reloaded when ``cell.apply``. The row holds every cell field, the plan's hash, predicted and
written bytes, predicted loss (and predicted KL where the profile maps its objective to KL), solve status,
gap and time, the evaluation (KL mean / median / p99 / p99.9 / max, top-1 agreement, perplexity, bits per
byte, the original's perplexity on the same tokens), wall time and the git commit. A plan that cannot fit the
budget is a row with ``status = "does not fit"``; bad input raises.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from optimizer.baselines import BaselineOptions
from optimizer.budget import Budget, make_budget
from optimizer.errors import InfeasibleError, InputError
from optimizer.formulation.instance import FormulationOptions
from optimizer.plan import Plan, Target, plan_to_json, save_plan
from optimizer.profile import Profile, load_profile
from optimizer.solve import SolveOptions, optimize
from profiling.refine import DEFAULT_REFINE_TOKENS, calibration_source, refine
from profiling.run import details_path
from runtime.gguf_eval import evaluate_gguf
from runtime.gguf_export import export_gguf

from .sweep import Cell

ROOT = Path(__file__).resolve().parents[1]
EVAL_FIELDS = ("kl_mean", "kl_median", "kl_p99", "kl_p999", "kl_max", "top1_agreement", "perplexity",
               "bits_per_byte", "reference_perplexity", "tokens", "window")


@lru_cache(maxsize=1)
def git_sha() -> str:
    """The commit the code runs at (``+dirty`` when the tree has uncommitted changes)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (sha or "unknown") + ("+dirty" if dirty else "")


@lru_cache(maxsize=4)
def _profile(path: str, mtime: float) -> Profile:
    return load_profile(path)


def cached_profile(path: str) -> Profile:
    """The profile at ``path``, loaded once per process (keyed by path and modification time)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"cell.profile: {path}: no such file")
    return _profile(str(p.resolve()), p.stat().st_mtime)


@lru_cache(maxsize=2)
def reference_model(path: str):  # noqa: ANN201 - a transformers model
    """The original model, loaded once per process (the KL reference of every cell on it)."""
    from runtime.evaluate import load_model

    return load_model(path)


def formulation_for(cell: Cell, profile: Profile) -> tuple[str, FormulationOptions, BaselineOptions]:
    """(solver name, formulation options, baseline options) that implement ``cell.method`` (see
    :mod:`experiments.sweep`)."""
    arch = profile.architecture
    experts = sorted({m.num_experts for m in arch.moe_layers})
    original_k = min(m.top_k for m in arch.moe_layers)
    keep_all = float(experts[0])
    base, fmt = cell.base_method, cell.method_format
    if base in ("quantize_only", "uniform", "topk_only") and len(experts) > 1:
        raise InputError(f"cell.method {cell.method}: layers have different expert counts {experts}")
    opts: dict[str, Any] = {"objective": cell.formulation}
    solver, baseline = "highs", BaselineOptions()
    if base == "quantize_only":
        opts.update(min_experts=keep_all, min_top_k=original_k)
    elif base == "no_topk":
        opts.update(min_top_k=original_k)
    elif base == "prune_only":
        opts.update(formats=(fmt or "BF16",), min_top_k=original_k)
    elif base == "topk_only":
        opts.update(formats=(fmt or "BF16",), min_experts=keep_all)
    elif base == "uniform":
        solver, baseline = "uniform", BaselineOptions(uniform_format=fmt)  # odd rows: same-bits stand-in
        opts.update(min_experts=keep_all, min_top_k=original_k)
    elif base in ("greedy", "sequential"):
        solver = base
    elif base == "llamacpp":
        opts.update(target=Target.LLAMACPP)
    return solver, FormulationOptions(**opts), baseline


def refined_plan(cell: Cell, profile: Profile, budget: Budget) -> Plan:
    """The plan :func:`profiling.refine.refine` hands over, measured on the profile's calibration text (its
    details file) with at least :data:`~profiling.refine.DEFAULT_REFINE_TOKENS` tokens; a calibrated profile's
    single-effect source proposes too (:func:`profiling.refine.calibration_source`)."""
    details_file = details_path(Path(cell.profile))
    details = json.loads(details_file.read_text()) if details_file.is_file() else {}
    result = refine(profile, cell.model, budget, data=details.get("data", "english:calibration"),
                    tokens=max(details.get("tokens", 0), DEFAULT_REFINE_TOKENS), window=details.get("window", 256),
                    alternatives=calibration_source(details, cell.profile))
    return result.best.plan


def solve_cell(cell: Cell) -> Plan:
    """The plan of ``cell``; raises :class:`InfeasibleError` when the method cannot fit the budget."""
    profile = cached_profile(cell.profile)
    budget = make_budget(profile.architecture, cell.budget, context=0, overhead=0)
    if cell.base_method == "refine":
        return refined_plan(cell, profile, budget)
    solver, formulation, baseline = formulation_for(cell, profile)
    return optimize(profile, budget, formulation,
                    SolveOptions(solver=solver, time_limit=cell.time_limit, reproducible=True, baseline=baseline))


def _compressed(cell: Cell, plan: Plan, work: Path) -> tuple[Any, int | None]:
    """The compressed model and the weight bytes written (None in memory)."""
    from runtime.apply import apply_plan
    from runtime.checkpoint import load_pretrained
    from runtime.inmemory import compress_in_memory
    from runtime.load import load

    if not cell.apply:
        return compress_in_memory(load_pretrained(cell.model), plan, cell.quantizer), None
    save_plan(plan, work / "plan.json")
    report = apply_plan(work / "plan.json", cell.model, work / "out", method=cell.quantizer)
    return load(work / "out"), report.weight_bytes


def _plan_fields(plan: Plan) -> dict[str, Any]:
    s = plan.solve
    doc = json.dumps(plan_to_json(plan), sort_keys=True, separators=(",", ":")).encode()
    return {"plan_sha256": hashlib.sha256(doc).hexdigest()[:16], "plan_bytes": plan.bytes.total,
            "predicted_loss": s.objective, "predicted_kl": plan.predicted.get("kl"),
            "solve_status": s.status.value, "gap": s.gap,
            "kept_experts": sum(len(lp.kept_experts) for lp in plan.layers),
            "mean_top_k": float(np.mean([lp.top_k for lp in plan.layers])) if plan.layers else None,
            "formats": ",".join(sorted(set(plan.formats.values())))}


def run_cell(cell: Cell) -> dict[str, Any]:
    """Solve, compress and evaluate one cell (see the module docstring); returns its row."""
    import torch

    from runtime.evaluate import evaluate

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"key": cell.key(), **cell.to_json(), "git_sha": git_sha()}
    try:
        plan = solve_cell(cell)
    except InfeasibleError as exc:
        return {**row, "status": "does not fit", "message": str(exc).splitlines()[0][:200],
                "wall_seconds": round(time.perf_counter() - t0, 2)}
    row.update(_plan_fields(plan), solve_seconds=round(time.perf_counter() - t0, 3))
    with tempfile.TemporaryDirectory(prefix="moecc-cell-") as tmp:
        if cell.engine == "llamacpp":
            res, written = _in_llama_cpp(cell, plan, Path(tmp))
        else:
            model, written = _compressed(cell, plan, Path(tmp))
            res = evaluate(model, cell.eval_corpus, cell.eval_split, cell.eval_tokens, cell.window,
                           reference=reference_model(cell.model))
    row.update({f: getattr(res, f, None) for f in EVAL_FIELDS}, written_bytes=written, status="ok",
               wall_seconds=round(time.perf_counter() - t0, 2))
    return row


def _in_llama_cpp(cell: Cell, plan: Plan, work: Path) -> tuple[Any, int]:
    """The plan's GGUF (``runtime export --to gguf``, checked against the plan) scored against the original in
    llama.cpp (``runtime eval model.gguf``); the result and the GGUF's tensor bytes."""
    save_plan(plan, work / "plan.json")
    check = export_gguf(work / "plan.json", cell.model, work / "model.gguf", threads=1)
    res = evaluate_gguf(work / "model.gguf", cell.model, cell.eval_corpus, cell.eval_split, cell.eval_tokens,
                        cell.window, threads=1, bench=False)
    return res, check.gguf_bytes
