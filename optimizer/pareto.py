"""The loss-vs-decode-speed frontier of a profile at a budget: ``python -m optimizer pareto PROFILE --budget B -o DIR``.

    speed(plan) = bandwidth / (bytes read per token),  bytes read = the speed row (5) of the formulation

Point 0 is the unconstrained optimum (the Lagrangian decomposition; ``proven`` when its certificate closes the
gap). The other points ask for ``--points`` speed floors spaced geometrically from just above point 0's speed
to just below the fastest any plan can reach (:func:`~optimizer.formulation.speed.fastest_read`, an upper
bound on speed), and each takes the plan of the speed heuristic (:mod:`optimizer.formulation.speed`). Each
row carries a valid lower bound at its floor (the better of the unconstrained Lagrangian bound and
:func:`~optimizer.formulation.speed.speed_bound`), not a tight one where the floor binds: the frontier is what
the heuristic achieves, not a proven one. Written to ``DIR``:
``pareto.csv`` (one row per point), ``pareto.json`` (the same rows) and ``pareto.png`` (loss against tokens/s).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from .budget import Budget
from .errors import InputError
from .formulation.decisions import Decisions
from .formulation.decomposition import lagrangian
from .formulation.instance import FormulationOptions, Instance, build_instance
from .formulation.speed import fastest_read, plan_read, speed_bound, speed_plan
from .plan import Target
from .profile import Profile


@dataclass(frozen=True)
class FrontierPoint:
    """One plan on the frontier (see the module docstring); losses in the objective's units."""

    floor_tokens_per_s: float | None  # the speed asked for (None: unconstrained)
    tokens_per_s: float  # the plan's speed under the speed row's model
    objective: float
    bound: float  # the unconstrained Lagrangian bound
    gap: float
    proven: bool  # the plan is proven optimal (to the Lagrangian's gap) for its floor
    mean_top_k: float
    kept_experts: int
    weight_bytes: int
    seconds: float


def _point(inst: Instance, d: Decisions, floor: float | None, bound: float, proven: bool,
           seconds: float) -> FrontierPoint:
    obj = d.objective(inst)
    gap = max(0.0, (obj - bound) / max(abs(obj), 1e-12))
    return FrontierPoint(floor, inst.tokens_per_s(plan_read(inst, d)), obj, bound, gap, proven, float(np.mean(d.top_k)),
                         int(d.keep.sum()), d.weight_bytes(inst), round(seconds, 3))


def speed_frontier(profile: Profile, budget: Budget, formulation: FormulationOptions | None = None,
                   points: int = 8, rel_gap: float = 1e-4) -> list[FrontierPoint]:
    """The frontier's points, fastest last (see the module docstring); InputError for options it cannot take."""
    fo = formulation or FormulationOptions()
    if fo.target != Target.HF or fo.min_tokens_per_s is not None:
        raise InputError("pareto: --target hf and no --min-tokens-per-s (the frontier sweeps the floor itself)")
    if not 1 <= points <= 100:
        raise InputError(f"--points: must lie in [1, 100], got {points}")
    t0 = time.perf_counter()
    # one instance with a speed floor: its presolve keeps what is dominated in bytes, read and cost alike
    inst = build_instance(profile, budget, replace(fo, min_tokens_per_s=1.0))
    free = replace(inst, options=replace(inst.options, min_tokens_per_s=None))
    first = lagrangian(free, rel_gap)
    if first is None:
        raise InputError("pareto: no plan fits the budget")
    out = [_point(inst, first.decisions, None, first.bound, first.gap <= rel_gap, time.perf_counter() - t0)]
    fastest = inst.tokens_per_s(fastest_read(inst))
    slow = out[0].tokens_per_s
    if fastest <= slow * 1.001:
        return out
    for j in range(1, points + 1):  # geometric, from just above point 0 to just below the fastest
        floor = slow * (fastest / slow) ** (j / (points + 1))
        t = time.perf_counter()
        at = replace(inst, options=replace(inst.options, min_tokens_per_s=floor))
        d = speed_plan(at, rel_gap, start=first)
        if d is not None:
            bound = max(first.bound, speed_bound(at, first.multiplier))
            out.append(_point(at, d, floor, bound, False, time.perf_counter() - t))
    return out


def write_frontier(rows: list[FrontierPoint], out: Path, title: str = "") -> list[Path]:
    """``pareto.csv``, ``pareto.json`` and ``pareto.png`` in ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    docs = [asdict(r) for r in rows]
    with open(out / "pareto.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(docs[0]))
        writer.writeheader()
        writer.writerows(docs)
    (out / "pareto.json").write_text(json.dumps(docs, indent=1) + "\n", encoding="utf-8")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r.tokens_per_s for r in rows], [r.objective for r in rows], "o-", label="plan (speed heuristic)")
    ax.axhline(rows[0].bound, color="grey", ls="--", lw=1, label="unconstrained bound")
    ax.set_xlabel("decode tokens/s (bandwidth model)")
    ax.set_ylabel("predicted loss (objective)")
    ax.set_title(title or "loss vs decode speed")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    return [out / "pareto.csv", out / "pareto.json", out / "pareto.png"]


def render_frontier(rows: list[FrontierPoint]) -> str:
    """The frontier as a text table."""
    lines = ["floor tok/s  tok/s    objective   gap      mean k  experts  weight bytes    seconds"]
    for r in rows:
        floor = "-" if r.floor_tokens_per_s is None else f"{r.floor_tokens_per_s:.2f}"
        gap = "proven" if r.proven else f"{100 * r.gap:.2f}%"
        lines.append(f"{floor:>11}  {r.tokens_per_s:7.2f}  {r.objective:10.6f}  {gap:>7}  {r.mean_top_k:6.2f}  "
                     f"{r.kept_experts:7d}  {r.weight_bytes:14,d}  {r.seconds:7.2f}")
    return "\n".join(lines)


__all__ = ["FrontierPoint", "speed_frontier", "write_frontier", "render_frontier"]

