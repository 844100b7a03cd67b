"""A plan checked against the checkpoint it is applied to, before any weight is read.

``runtime apply`` and the llama.cpp export trust nothing in ``plan.json`` that the checkpoint's own
``config.json`` can check:

- ``solve.status`` must be ``optimal`` or ``feasible`` (a plan saved from a failed solve is not a plan);
- every MoE layer of the architecture has an entry in ``plan.layers`` (kept experts: distinct, in range,
  balanced across DeepSeek's expert groups; top-k reachable), and no other layer does;
- blocks whose format the architecture fixes (norms, routers, biases, the score-correction bias) keep it;
- ``bytes.by_kind`` and ``bytes.total`` equal the bytes recomputed from the layers and formats with
  :func:`optimizer.byte_model.plan_bytes_by_kind`, exactly.
"""
from __future__ import annotations

from optimizer.byte_model import plan_bytes_by_kind
from optimizer.errors import InputError
from optimizer.model_spec import Architecture
from optimizer.plan import Plan

from .moe import check_keep

#: per MoE layer index: (kept original expert indices, top-k)
Layers = dict[int, tuple[list[int], int]]


def validate_layers(plan: Plan, arch: Architecture) -> Layers:
    """Per MoE layer: (kept original expert indices, top-k); every MoE layer must be in the plan."""
    moe = {m.index: m for m in arch.moe_layers}
    out: Layers = {}
    for lp in plan.layers:
        if lp.layer not in moe:
            raise InputError(f"plan.layers: layer {lp.layer} is not an MoE layer of the checkpoint "
                             f"(its MoE layers: {sorted(moe)})")
        if lp.layer in out:
            raise InputError(f"plan.layers: layer {lp.layer} appears twice")
        keep = check_keep(moe[lp.layer].num_experts, lp.kept_experts, arch.expert_groups, arch.topk_groups,
                          lp.top_k, where=f"plan layer {lp.layer}")
        if lp.top_k < 1:
            raise InputError(f"plan layer {lp.layer}: top_k must be >= 1, got {lp.top_k}")
        out[lp.layer] = (keep, lp.top_k)
    missing = sorted(set(moe) - set(out))
    if missing:
        raise InputError(f"plan.layers: no entry for MoE layer {missing[0]} ({len(missing)} of {len(moe)} "
                         "MoE layers missing); a plan lists every MoE layer's kept experts and top-k")
    return dict(sorted(out.items()))


def check_status(plan: Plan) -> None:
    """Refuse a plan whose solve did not produce one."""
    if not plan.solve.status.has_plan:
        raise InputError(f"plan.solve.status: {plan.solve.status.value!r}; only an optimal or feasible plan "
                         "can be applied")


def check_fixed_formats(plan: Plan, arch: Architecture) -> None:
    """Norms, routers and biases keep the format the architecture fixes for them."""
    for block in arch.blocks:
        if block.quantizable:
            continue
        asked = plan.formats.get(block.name)
        if asked is not None and asked != block.fixed_format:
            raise InputError(f"plan.formats.{block.name}: a {block.kind.value} block is stored in "
                             f"{block.fixed_format}; it cannot be changed to {asked}")


def check_bytes(plan: Plan, arch: Architecture, layers: Layers) -> None:
    """``bytes.by_kind`` and ``bytes.total`` must equal the bytes the plan's layers and formats take."""
    by_kind = plan_bytes_by_kind(arch, {layer: keep for layer, (keep, _) in layers.items()}, dict(plan.formats))
    for kind in sorted(set(by_kind) | set(plan.bytes.by_kind)):
        want, got = by_kind.get(kind, 0), plan.bytes.by_kind.get(kind, 0)
        if want != got:
            raise InputError(f"plan.bytes.by_kind.{kind}: {got:,} bytes, but the plan's formats and kept experts "
                             f"take {want:,} on this architecture; the plan was edited or is corrupt")
    total = sum(by_kind.values())
    if plan.bytes.total != total:
        raise InputError(f"plan.bytes.total: {plan.bytes.total:,} bytes, but the plan's formats and kept experts "
                         f"take {total:,}; the plan was edited or is corrupt")


def check_plan(plan: Plan, arch: Architecture) -> Layers:
    """Every check of the module docstring, in order; returns :func:`validate_layers`' result."""
    check_status(plan)
    layers = validate_layers(plan, arch)
    check_fixed_formats(plan, arch)
    check_bytes(plan, arch, layers)
    return layers
