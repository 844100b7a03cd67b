"""Human-readable and JSON summaries of a plan (the tables ``solve`` prints and ``explain`` shows)."""

from __future__ import annotations

import io
from collections import Counter

from rich.console import Console
from rich.table import Table

from .budget import format_bytes
from .plan import Plan


def plan_summary(plan: Plan) -> dict:
    """Counts and totals a user looks at first; everything else is in the plan file."""
    s = plan.solve
    kept = [len(lp.kept_experts) for lp in plan.layers]
    return {
        "model": plan.model_name, "target": plan.target.value, "status": s.status.value, "solver": s.solver,
        "formulation": s.formulation, "objective": s.objective, "bound": s.bound, "gap": s.gap, "seconds": s.seconds,
        "bytes_total": plan.bytes.total, "bytes_by_kind": plan.bytes.by_kind, "budget": plan.bytes.budget,
        "reserves": plan.bytes.reserves, "available": plan.bytes.available,
        "kept_experts_per_layer": {str(lp.layer): len(lp.kept_experts) for lp in plan.layers},
        "top_k_per_layer": {str(lp.layer): lp.top_k for lp in plan.layers},
        "kept_experts_total": sum(kept), "format_histogram": dict(sorted(Counter(plan.formats.values()).items())),
        "predicted": plan.predicted, "message": s.message,
    }


def _runs(values: list[tuple[int, str]]) -> str:
    """Compress per-layer values into ranges: ``3-20: 192, 21-60: 160``."""
    parts, start, prev, cur = [], None, None, None
    for layer, v in values:
        if cur is not None and v == cur and layer == prev + 1:
            prev = layer
            continue
        if cur is not None:
            parts.append(f"{start}-{prev}: {cur}" if start != prev else f"{start}: {cur}")
        start = prev = layer
        cur = v
    if cur is not None:
        parts.append(f"{start}-{prev}: {cur}" if start != prev else f"{start}: {cur}")
    return ", ".join(parts)


def render_plan(plan: Plan, width: int = 110) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    s = plan.solve
    gap = "n/a" if s.gap is None else f"{100 * s.gap:.4f}%"
    secs = "n/a" if s.seconds is None else f"{s.seconds:.2f} s"
    console.print(f"[bold]{plan.model_name}[/] target={plan.target.value} solver={s.solver} "
                  f"formulation={s.formulation}")
    objective = "n/a" if s.objective is None else f"{s.objective:.6g}"
    console.print(f"status: {s.status.value}  objective: {objective}  bound: "
                  f"{'n/a' if s.bound is None else f'{s.bound:.6g}'}  gap: {gap}  time: {secs}")
    if s.message:
        console.print(f"  {s.message}")
    t = Table(title="bytes by kind")
    t.add_column("kind")
    t.add_column("bytes", justify="right")
    t.add_column("share", justify="right")
    for kind, n in sorted(plan.bytes.by_kind.items(), key=lambda kv: -kv[1]):
        t.add_row(kind, format_bytes(n), f"{100 * n / max(plan.bytes.total, 1):.1f}%")
    t.add_row("weights total", format_bytes(plan.bytes.total), "")
    for name, n in plan.bytes.reserves.items():
        t.add_row(f"reserve: {name}", format_bytes(n), "")
    t.add_row("budget", format_bytes(plan.bytes.budget),
              f"{100 * (plan.bytes.total + sum(plan.bytes.reserves.values())) / max(plan.bytes.budget, 1):.1f}% used")
    console.print(t)
    console.print("kept experts per layer: " + _runs([(lp.layer, len(lp.kept_experts)) for lp in plan.layers]))
    console.print("top-k per layer:        " + _runs([(lp.layer, lp.top_k) for lp in plan.layers]))
    hist = Counter(plan.formats.values())
    console.print("format histogram (blocks): " + ", ".join(f"{k} {v}" for k, v in sorted(hist.items())))
    pred = plan.predicted
    if pred:
        console.print(f"predicted: loss increase {pred.get('loss_increase', float('nan')):.6g} nats/token, "
                      f"decode ~{pred.get('decode_tokens_per_s', float('nan')):.2f} tokens/s (the device model)")
        if "kl" in pred:
            console.print(f"predicted KL to the original: {pred['kl']:.4g} nats/token (the profile's fitted "
                          "objective -> KL map)")
    return buf.getvalue().rstrip()
