"""Plans for real checkpoints without profiling: a seeded made-up profile over a model's true architecture.

``made_up_plan(model_dir, solver=..., fraction=...)`` reads ``config.json`` (no weights), draws simple routing
statistics and sensitivities (``4**-bits`` per format, scaled by routing mass) and solves with
:func:`optimizer.solve.optimize` for a budget of ``fraction`` x the BF16 size. The statistics are invented;
the plans are only good for exercising the runtime (tests, demos), never for judging quality.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from optimizer.architectures import load_architecture
from optimizer.budget import Budget
from optimizer.byte_model import plan_bytes_by_kind, uniform_bytes
from optimizer.formats import get_format
from optimizer.formulation.instance import FormulationOptions
from optimizer.model_spec import Architecture
from optimizer.plan import LayerPlan, Plan, PlanBytes, Target
from optimizer.profile import Device, ExpertStats, Measurement, ModelInfo, Profile, Sensitivity, TopkCost
from optimizer.solve import SolveOptions, optimize

#: runtime-native formats that fit rows of 32 (the tiny models' hidden size)
TINY_FORMATS = ("int2_g32", "int3_g32", "int4_g32", "int8_g32", "BF16")


def made_up_profile(arch: Architecture, formats: tuple[str, ...] = TINY_FORMATS, seed: int = 0,
                    name: str = "made-up") -> Profile:
    """A seeded profile with invented statistics over ``arch`` (every ``measurement`` says so)."""
    rng = np.random.default_rng(seed)
    freq, score, mass, sal, prune = [], [], [], [], []
    for m in arch.moe_layers:
        f = rng.dirichlet(np.full(m.num_experts, 1.0))
        s = rng.uniform(0.2, 0.6, m.num_experts)
        ms = f * s / np.sum(f * s)
        freq.append(f), score.append(s), mass.append(ms), sal.append(ms.copy())
        prune.append(0.05 * ms)
    mass_of = {(m.index, e): mass[i][e] for i, m in enumerate(arch.moe_layers) for e in range(m.num_experts)}
    fmts = [get_format(f) for f in formats]
    values = np.full((len(arch.blocks), len(fmts)), np.nan)
    for b, block in enumerate(arch.blocks):
        if not block.quantizable:
            continue
        weight = mass_of[(block.layer, block.expert)] if block.is_routed_expert else 0.2
        for j, fmt in enumerate(fmts):
            if fmt.admits(block.shape):
                values[b, j] = 0.0 if not fmt.quantized else weight * 4.0 ** (-fmt.bits_per_weight)
    topk = [np.array([0.02 * (m.top_k - k) ** 1.5 / m.top_k for k in range(1, m.top_k + 1)]) for m in arch.moe_layers]
    meas = Measurement(method=f"made-up statistics for runtime tests (seed {seed}); not a measurement",
                       seed=seed, prior=True)
    names = tuple(f.name for f in fmts)
    return Profile(
        model=ModelInfo(name=name), architecture=arch, formats=names,
        experts=ExpertStats(tuple(freq), tuple(score), tuple(mass), tuple(sal), tuple(prune), meas, meas),
        sensitivity=Sensitivity(names, values, meas), topk_cost=TopkCost(tuple(topk), meas),
        device=Device(memory_bandwidth_bytes_per_s=50e9, measurement=meas),
    )


def made_up_plan(model_dir: str | Path, solver: str = "highs", fraction: float = 0.45,
                 formats: tuple[str, ...] = TINY_FORMATS, target: str = "hf", seed: int = 0,
                 min_experts: float = 0.0) -> Plan:
    """Solve a made-up profile of ``model_dir`` for ``fraction`` x its all-BF16 size (no reserves)."""
    arch = load_architecture(model_dir)
    profile = made_up_profile(arch, formats, seed, name=Path(model_dir).name)
    budget = Budget(int(uniform_bytes(arch, "BF16") * fraction), {})
    options = SolveOptions(solver=solver, time_limit=30.0, reproducible=True)
    form = FormulationOptions(target=Target(target), min_experts=min_experts)
    return optimize(profile, budget, form, options)


def restrict_plan(plan: Plan, arch: Architecture, layers: dict[int, tuple[list[int], int]],
                  formats: dict[str, str] | None = None) -> Plan:
    """``plan`` with some layers' kept experts and top-k replaced (and formats overridden); bytes recomputed.

    No validation: tests use it to make both good and deliberately bad plans.
    """
    new_layers = tuple(LayerPlan(lp.layer, tuple(layers[lp.layer][0]), layers[lp.layer][1]) if lp.layer in layers
                       else lp for lp in plan.layers)
    kept = {lp.layer: set(lp.kept_experts) for lp in new_layers}
    fmts = {**plan.formats, **(formats or {})}
    out_formats = {}
    for block in arch.blocks:
        if block.is_routed_expert and block.expert not in kept[block.layer]:
            continue
        out_formats[block.name] = fmts.get(block.name, "int4_g32")  # an expert the plan had pruned gets int4_g32
    by_kind = plan_bytes_by_kind(arch, kept, out_formats)
    pbytes = PlanBytes(sum(by_kind.values()), by_kind, plan.bytes.budget, dict(plan.bytes.reserves))
    return replace(plan, layers=new_layers, formats=out_formats, bytes=pbytes)
