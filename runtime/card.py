"""The model card (``README.md``) of a checkpoint written by ``python -m runtime apply``, made from its plan.

The source's own card, metrics and training logs describe the uncompressed model and are never copied; this
card says what the compressed one is: source and its fingerprint, plan and its hash, budget and bytes by kind,
kept experts and top-k per MoE layer, the format histogram, and the command that wrote it. Deterministic
for the same inputs and command.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from optimizer.budget import format_bytes
from optimizer.plan import Plan


@dataclass(frozen=True)
class CardInputs:
    """What the card reports besides the plan."""

    source: str  # the --model path as given
    source_fingerprint: str  # runtime.checkpoint.checkpoint_fingerprint
    plan_path: str
    plan_sha256: str
    method: str
    stored_formats: dict[str, str]  # block -> format written
    weight_bytes: int
    command: str


def _bytes_rows(plan: Plan) -> list[str]:
    rows = ["| kind | bytes | share |", "| --- | ---: | ---: |"]
    for kind, n in sorted(plan.bytes.by_kind.items(), key=lambda kv: (-kv[1], kv[0])):
        rows.append(f"| {kind} | {n:,} | {100 * n / max(plan.bytes.total, 1):.1f}% |")
    rows.append(f"| **weights total** | **{plan.bytes.total:,}** | |")
    return rows


def _layer_rows(plan: Plan, original: dict[int, tuple[int, int]]) -> list[str]:
    rows = ["| MoE layer | kept experts | top-k |", "| ---: | ---: | ---: |"]
    for lp in plan.layers:
        num, k = original.get(lp.layer, (len(lp.kept_experts), lp.top_k))
        rows.append(f"| {lp.layer} | {len(lp.kept_experts)} of {num} | {lp.top_k} of {k} |")
    return rows


def render_card(plan: Plan, inputs: CardInputs, original: dict[int, tuple[int, int]]) -> str:
    """Markdown card; ``original``: per MoE layer (experts, top-k) of the source model."""
    hist = Counter(inputs.stored_formats.values())
    reserves = ", ".join(f"{name} {format_bytes(n)}" for name, n in plan.bytes.reserves.items()) or "none"
    s = plan.solve
    lines = [
        f"# {plan.model_name}, compressed by moecc",
        "",
        f"Written by `python -m runtime apply` from the plan `{inputs.plan_path}` (sha256 `{inputs.plan_sha256}`), "
        f"quantizer `{inputs.method}`. This card describes the compressed checkpoint; the source model's own "
        "card, metrics and training logs are not copied, since they describe the uncompressed model.",
        "",
        f"- source: `{inputs.source}` ({plan.family}; architecture `{plan.architecture_hash}`; "
        f"checkpoint fingerprint `{inputs.source_fingerprint}`)",
        f"- plan: target `{plan.target.value}`, solver `{s.solver}`, formulation `{s.formulation}`, "
        f"status `{s.status.value}`" + (f", predicted loss increase {s.objective:.6g} nats/token"
                                        if s.objective is not None else ""),
        f"- budget: {format_bytes(plan.bytes.budget)} ({plan.bytes.budget:,} bytes); reserves: {reserves}",
        f"- weights written: {inputs.weight_bytes:,} bytes (the plan predicts {plan.bytes.total:,})",
        "",
        "## Bytes by kind (predicted by the plan)",
        "",
        *_bytes_rows(plan),
        "",
        "## Kept experts and top-k per MoE layer",
        "",
        *_layer_rows(plan, original),
        "",
        "## Formats written (blocks)",
        "",
        "| format | blocks |",
        "| --- | ---: |",
        *[f"| {fmt} | {n} |" for fmt, n in sorted(hist.items())],
        "",
        "## How it was made, and how to use it",
        "",
        "```",
        inputs.command,
        "```",
        "",
        "Load it with `runtime.load.load(DIR)`, or score it with `python -m runtime eval DIR`.",
        "",
    ]
    return "\n".join(lines)
