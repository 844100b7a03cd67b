"""The ``plan.json`` contract (schema ``moecc.plan``, version 1): what to keep, how to route, how to store.

Field-by-field documentation: ``docs/plan.md``; JSON Schema: ``optimizer/schemas/plan.schema.json``.
A plan names every block that survives (``formats``: block name -> format); blocks of pruned experts are
absent. Expert indices are the original ones of the profiled checkpoint. Counts are bounded by the
``MAX_*`` limits of :mod:`optimizer.model_spec`, byte counts by :data:`optimizer.budget.MAX_BYTES`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .budget import MAX_BYTES
from .errors import InputError
from .formats import get_format
from .jsonio import Reader, as_int, check_envelope, read_json, write_json
from .model_spec import MAX_BLOCKS, MAX_EXPERTS, MAX_LAYERS

PLAN_SCHEMA = "moecc.plan"
PLAN_VERSION = 1


class Target(str, Enum):
    """Deployment target; decides which per-expert / per-layer freedoms a plan may use."""

    HF = "hf"  # transformers / vLLM-style loaders: per-expert formats, per-layer k and expert counts
    LLAMACPP = "llamacpp"  # one 3-D tensor per (layer, projection): shared format, one expert count, one k


class SolveStatus(str, Enum):
    """Outcome of a solve, the same for every backend."""

    OPTIMAL = "optimal"  # proven optimal within the requested relative gap
    FEASIBLE = "feasible"  # a plan within the budget, optimality not proven (time limit)
    INFEASIBLE = "infeasible"
    NO_SOLUTION = "no_solution"  # stopped (time limit) before any feasible plan was found
    ERROR = "error"

    @property
    def has_plan(self) -> bool:
        return self in (SolveStatus.OPTIMAL, SolveStatus.FEASIBLE)


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    kept_experts: tuple[int, ...]
    top_k: int


@dataclass(frozen=True)
class PlanBytes:
    """Predicted bytes of the weights (``total`` and ``by_kind``) against the budget and its reserves."""

    total: int
    by_kind: dict[str, int]
    budget: int
    reserves: dict[str, int]

    @property
    def available(self) -> int:
        return self.budget - sum(self.reserves.values())


@dataclass(frozen=True)
class SolveRecord:
    solver: str
    formulation: str
    status: SolveStatus
    objective: float | None
    bound: float | None
    gap: float | None
    seconds: float | None
    profile_hash: str
    options: dict[str, Any] = field(default_factory=dict)
    message: str = ""


@dataclass(frozen=True)
class Plan:
    model_name: str
    family: str
    architecture_hash: str
    target: Target
    layers: tuple[LayerPlan, ...]
    formats: dict[str, str]
    bytes: PlanBytes
    solve: SolveRecord
    predicted: dict[str, float] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def layer(self, index: int) -> LayerPlan:
        for lp in self.layers:
            if lp.layer == index:
                return lp
        raise KeyError(index)

    def to_json(self) -> dict:
        return plan_to_json(self)


def plan_to_json(plan: Plan) -> dict:
    s = plan.solve
    return {
        "schema": PLAN_SCHEMA,
        "version": PLAN_VERSION,
        "model": {"name": plan.model_name, "family": plan.family, "architecture_hash": plan.architecture_hash},
        "target": plan.target.value,
        "layers": [{"layer": lp.layer, "top_k": lp.top_k, "kept_experts": list(lp.kept_experts)} for lp in plan.layers],
        "formats": dict(plan.formats),
        "bytes": {
            "total": plan.bytes.total, "by_kind": dict(plan.bytes.by_kind), "budget": plan.bytes.budget,
            "reserves": dict(plan.bytes.reserves), "available": plan.bytes.available,
        },
        "predicted": {k: float(f"{v:.9g}") for k, v in plan.predicted.items()},
        "solve": {
            "solver": s.solver, "formulation": s.formulation, "status": s.status.value,
            "objective": _round(s.objective), "bound": _round(s.bound), "gap": _round(s.gap),
            "seconds": None if s.seconds is None else round(s.seconds, 3),
            "profile_hash": s.profile_hash, "options": s.options, "message": s.message,
        },
    }


def _round(v: float | None) -> float | None:
    return None if v is None else float(f"{v:.12g}")


def save_plan(plan: Plan, path: str | os.PathLike) -> None:
    write_json(path, plan_to_json(plan), indent=1)


def load_plan(path: str | os.PathLike) -> Plan:
    doc, _ = read_json(path)
    return plan_from_json(doc)


def plan_from_json(doc: Any) -> Plan:
    version = check_envelope(doc, PLAN_SCHEMA, PLAN_VERSION, "plan")
    r = Reader(doc, "plan")
    r.str("schema"), r.int("version")
    m = r.child("model")
    name, family, arch_hash = m.str("name"), m.str("family"), m.str("architecture_hash")
    m.done()
    target = Target(r.str("target", choices=tuple(t.value for t in Target)))
    layers: list[LayerPlan] = []
    layers_raw = r.list("layers")
    if len(layers_raw) > MAX_LAYERS:
        raise InputError(f"plan.layers: {len(layers_raw)} entries, more than the limit of {MAX_LAYERS} layers")
    for i, item in enumerate(layers_raw):
        lr = Reader(item, f"plan.layers[{i}]")
        layer, top_k = lr.int("layer", maximum=MAX_LAYERS), lr.int("top_k", minimum=1, maximum=MAX_EXPERTS)
        kept_raw = lr.list("kept_experts")
        if len(kept_raw) > MAX_EXPERTS:
            raise InputError(f"plan.layers[{i}].kept_experts: {len(kept_raw)} experts, more than the limit of "
                             f"{MAX_EXPERTS}")
        kept = tuple(as_int(e, f"plan.layers[{i}].kept_experts[{j}]", 0, MAX_EXPERTS) for j, e in enumerate(kept_raw))
        lr.done()
        if len(set(kept)) != len(kept) or list(kept) != sorted(kept):
            raise InputError(f"plan.layers[{i}].kept_experts: must be sorted and without duplicates")
        if top_k > len(kept):
            raise InputError(f"plan.layers[{i}].top_k: {top_k} > {len(kept)} kept experts")
        if any(lp.layer == layer for lp in layers):
            raise InputError(f"plan.layers[{i}].layer: duplicate layer {layer}")
        layers.append(LayerPlan(layer, kept, top_k))
    fr = r.child("formats")
    if len(fr.obj) > MAX_BLOCKS:
        raise InputError(f"plan.formats: {len(fr.obj)} blocks, more than the limit of {MAX_BLOCKS} (2**21)")
    formats = {}
    for key in list(fr.obj):
        fmt = fr.str(key)
        try:
            formats[key] = get_format(fmt).name
        except ValueError as exc:  # InputError, or int() of a 5000-digit group size
            raise InputError(f"plan.formats.{key}: {exc}") from None
    fr.done()
    br = r.child("bytes")
    by_kind_r, reserves_r = br.child("by_kind"), br.child("reserves")
    by_kind = {k: by_kind_r.int(k, maximum=MAX_BYTES) for k in list(by_kind_r.obj)}
    reserves = {k: reserves_r.int(k, maximum=MAX_BYTES) for k in list(reserves_r.obj)}
    by_kind_r.done()
    reserves_r.done()
    pbytes = PlanBytes(br.int("total", maximum=MAX_BYTES), by_kind, br.int("budget", minimum=1, maximum=MAX_BYTES),
                       reserves)
    br.int("available", minimum=-MAX_BYTES, maximum=MAX_BYTES)
    br.done()
    pr = r.child("predicted", required=False)
    predicted = {}
    if pr is not None:
        predicted = {k: pr.number(k, minimum=None) for k in list(pr.obj)}
        pr.done()
    sr = r.child("solve")
    options = sr.any("options", required=False)
    if options is not None and not isinstance(options, dict):
        raise InputError(f"plan.solve.options: expected an object, got {type(options).__name__}")
    status = SolveStatus(sr.str("status", choices=tuple(s.value for s in SolveStatus)))
    record = SolveRecord(
        solver=sr.str("solver"), formulation=sr.str("formulation"), status=status,
        objective=sr.number("objective", required=False, minimum=None),
        bound=sr.number("bound", required=False, minimum=None),
        gap=sr.number("gap", required=False), seconds=sr.number("seconds", required=False),
        profile_hash=sr.str("profile_hash"), options=options or {},
        message=sr.str("message", required=False) or "",
    )
    sr.done()
    r.done()
    return Plan(name, family, arch_hash, target, tuple(layers), formats, pbytes, record, predicted, version)
