"""Baselines (uniform, greedy, sequential): valid plans under every constraint, never better than the ILP optimum,
and the recipes they promise (sequential's retain ratio, uniform's single format)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from optimizer.baselines import BASELINES, BaselineOptions, run_baseline
from optimizer.budget import Budget
from optimizer.byte_model import block_bytes
from optimizer.errors import InfeasibleError
from optimizer.formats import get_format
from optimizer.formulation.constraints import build_milp
from optimizer.formulation.decisions import check_decisions
from optimizer.formulation.decomposition import min_weight_bytes
from optimizer.formulation.instance import FormulationOptions, build_instance
from optimizer.plan import Target
from optimizer.profile import Profile
from optimizer.solve import SolveOptions, optimize
from optimizer.synthetic import synthetic_profile

# rows of 256 take every candidate; the expert down_proj [256, 64] has rows of 64 that K-quants cannot store
ARCH = dict(num_layers=3, num_experts=8, top_k=4, hidden=256, expert_inter=64, dense_inter=256, vocab=256)
GROUPED = dict(ARCH, groups=2, topk_groups=1)
EXACT = SolveOptions(time_limit=30, rel_gap=1e-9)
RESERVES = {"kv_cache": 2048, "overhead": 512}


def sizes(profile: Profile, fo: FormulationOptions) -> tuple[int, int, int]:
    """(smallest plan, every expert kept in its smallest formats, everything in its largest format), bytes."""
    inst = build_instance(profile, Budget(10**15, {}), dataclasses.replace(fo, presolve=False))
    q = np.flatnonzero(inst.block_quantizable)
    fixed = int(inst.router_bytes.sum() + inst.fixed_bytes)
    smallest = int(np.minimum.reduceat(inst.pair_bytes, inst.pair_ptr[q]).sum()) + fixed
    largest = int(np.maximum.reduceat(inst.pair_bytes, inst.pair_ptr[q]).sum()) + fixed
    return min_weight_bytes(inst), smallest, largest


def budget_of(weights: int) -> Budget:
    return Budget(int(weights) + sum(RESERVES.values()), dict(RESERVES))


def all_experts_budget(profile: Profile, fo: FormulationOptions, frac: float) -> Budget:
    """A budget where every expert fits in its smallest format, plus ``frac`` of the way to the largest."""
    _, lo, hi = sizes(profile, fo)
    return budget_of(lo + frac * (hi - lo))


CASES = [
    (ARCH, Target.HF), (ARCH, Target.LLAMACPP), (GROUPED, Target.HF), (GROUPED, Target.LLAMACPP),
]


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("arch,target", CASES)
@pytest.mark.parametrize("frac", [0.05, 0.4])
def test_baseline_plans_satisfy_every_constraint_and_never_beat_the_ilp(name: str, arch: dict, target: Target,
                                                                         frac: float) -> None:
    p = synthetic_profile(seed=3, **arch)
    fo = FormulationOptions(target=target)
    budget = all_experts_budget(p, fo, frac)
    inst = build_instance(p, budget, dataclasses.replace(fo, presolve=False))
    model, v = build_milp(inst)
    d = run_baseline(name, inst)
    assert d is not None
    assert check_decisions(inst, model, v, d) == []
    assert d.weight_bytes(inst) <= budget.available
    plan = optimize(p, budget, fo, SolveOptions(solver=name, time_limit=30))
    assert plan.solve.solver == name and plan.solve.status.value == "feasible"
    assert plan.solve.objective == pytest.approx(d.objective(inst), rel=1e-12)
    assert plan.bytes.total <= budget.available
    ilp = optimize(p, budget, fo, EXACT)
    assert plan.solve.objective >= ilp.solve.bound - 1e-12
    assert plan.solve.objective >= ilp.solve.objective * (1 - 1e-9) - 1e-12
    if target == Target.LLAMACPP:
        assert len({len(lp.kept_experts) for lp in plan.layers}) == 1
        assert len({lp.top_k for lp in plan.layers}) == 1
        per_proj: dict[tuple, set] = {}
        for block in p.architecture.blocks:
            if block.is_routed_expert and block.name in plan.formats:
                per_proj.setdefault((block.layer, block.projection), set()).add(plan.formats[block.name])
        assert all(len(s) == 1 for s in per_proj.values())


def importance(profile: Profile, alpha: float = 0.5) -> list[np.ndarray]:
    return [alpha * f / f.sum() + (1 - alpha) * s / s.sum()
            for f, s in zip(profile.experts.frequency, profile.experts.mean_score)]


@pytest.mark.parametrize("arch", [ARCH, GROUPED], ids=["flat", "groups"])
@pytest.mark.parametrize("ratio", [0.75, 0.5, 0.6])
@pytest.mark.parametrize("target", [Target.HF, Target.LLAMACPP])
def test_sequential_keeps_the_retain_ratio(arch: dict, ratio: float, target: Target) -> None:
    p = synthetic_profile(seed=5, **arch)
    fo = FormulationOptions(target=target)
    budget = all_experts_budget(p, fo, 0.2)
    plan = optimize(p, budget, fo, SolveOptions(solver="sequential", baseline=BaselineOptions(retain_ratio=ratio)))
    G = p.architecture.expert_groups
    scores = importance(p)
    for i, m in enumerate(p.architecture.moe_layers):
        lp = plan.layer(m.index)
        per_group = m.num_experts // G
        keep_per_group = math.ceil(ratio * m.num_experts / G)  # ceil(r E) per layer when G = 1
        assert len(lp.kept_experts) == G * keep_per_group
        assert lp.top_k == math.ceil(ratio * m.top_k)
        for g in range(G):
            members = np.arange(g * per_group, (g + 1) * per_group)
            expected = members[np.argsort(-scores[i][members], kind="stable")[:keep_per_group]]
            assert (sorted(e for e in lp.kept_experts if g * per_group <= e < (g + 1) * per_group)
                    == sorted(expected.tolist()))


def test_sequential_recipe_matches_the_paper_counts() -> None:
    # r = 0.75 of 8 experts and top-4: keep 6 experts, route to 3
    p = synthetic_profile(seed=1, **ARCH)
    plan = optimize(p, all_experts_budget(p, FormulationOptions(), 0.3), None, SolveOptions(solver="sequential"))
    assert [(len(lp.kept_experts), lp.top_k) for lp in plan.layers] == [(6, 3), (6, 3)]


def uniform_choice(block, fmt: str, candidates: tuple[str, ...]) -> str:
    """The format uniform gives a block when ``fmt`` is the plan's format: fmt, else the next larger it admits."""
    if get_format(fmt).admits(block.shape):
        return fmt
    bpw = get_format(fmt).bits_per_weight
    fits = [c for c in candidates if get_format(c).admits(block.shape)]
    bigger = [c for c in fits if get_format(c).bits_per_weight >= bpw]
    if bigger:
        return min(bigger, key=lambda c: get_format(c).bits_per_weight)
    return max(fits, key=lambda c: get_format(c).bits_per_weight)


def uniform_bytes(profile: Profile, fmt: str) -> int:
    plan_formats = {b.name: uniform_choice(b, fmt, profile.formats)
                    for b in profile.architecture.blocks if b.quantizable}
    return sum(block_bytes(b, plan_formats.get(b.name, "F32")) for b in profile.architecture.blocks)


@pytest.mark.parametrize("target", [Target.HF, Target.LLAMACPP])
@pytest.mark.parametrize("frac", [0.02, 0.3, 0.7, 1.0])
def test_uniform_uses_one_format(target: Target, frac: float) -> None:
    p = synthetic_profile(seed=2, **ARCH)
    fo = FormulationOptions(target=target)
    budget = all_experts_budget(p, fo, frac)
    plan = optimize(p, budget, fo, SolveOptions(solver="uniform"))
    arch = p.architecture
    assert all(len(lp.kept_experts) == m.num_experts and lp.top_k == m.top_k
               for lp, m in zip(plan.layers, arch.moe_layers))
    fmt = plan.formats["model.embed_tokens.weight"]  # rows of 256: every candidate fits
    for block in arch.blocks:
        if block.quantizable:
            assert plan.formats[block.name] == uniform_choice(block, fmt, p.formats), block.name
    # the largest such format that fits: the next larger uniform format does not
    bpw = get_format(fmt).bits_per_weight
    larger = sorted((f for f in p.formats if get_format(f).bits_per_weight > bpw),
                    key=lambda f: get_format(f).bits_per_weight)
    assert uniform_bytes(p, fmt) == plan.bytes.total
    if larger:
        assert uniform_bytes(p, larger[0]) > budget.available
    if frac == 1.0:
        assert fmt == "BF16"


def test_uniform_with_k_quant_gives_down_projections_the_next_larger_format() -> None:
    p = synthetic_profile(seed=2, **ARCH)
    q4 = uniform_bytes(p, "Q4_K")
    plan = optimize(p, budget_of(q4), None, SolveOptions(solver="uniform"))
    down = [b for b in p.architecture.blocks if b.is_routed_expert and b.projection == "down_proj"]
    gate = [b for b in p.architecture.blocks if b.is_routed_expert and b.projection == "gate_proj"]
    assert {plan.formats[b.name] for b in gate} == {"Q4_K"}
    assert {plan.formats[b.name] for b in down} == {"Q8_0"}  # Q6_K cannot store rows of 64 either
    assert plan.bytes.total == q4


def test_uniform_format_option_takes_that_format_even_when_a_larger_fits() -> None:
    p = synthetic_profile(seed=2, **ARCH)
    q4 = uniform_bytes(p, "Q4_K")
    options = SolveOptions(solver="uniform", baseline=BaselineOptions(uniform_format="Q4_K"))
    plan = optimize(p, budget_of(10 * q4), None, options)  # BF16 would fit; Q4_K is asked for
    assert plan.bytes.total == q4 and plan.formats["model.embed_tokens.weight"] == "Q4_K"
    with pytest.raises(InfeasibleError):
        optimize(p, budget_of(q4 - 1), None, options)
    with pytest.raises(Exception, match="not among the candidate formats"):
        optimize(p, budget_of(q4), None,
                 SolveOptions(solver="uniform", baseline=BaselineOptions(uniform_format="IQ1_S")))


def test_uniform_int_format_gives_odd_rows_the_same_bits_in_another_group() -> None:
    """Experts 80 wide (R3's): no g64 group divides their down_proj rows. Uniform int3_g64 stores them in
    int3_g80 (3.4 bits/weight), not in the next larger format by bits per weight (int4_g80, 4.4)."""
    formats = ("int3_g64", "int4_g64", "int3_g80", "int4_g80", "BF16")
    p = synthetic_profile(seed=2, formats=formats, **dict(ARCH, expert_inter=80))
    down = [b for b in p.architecture.blocks if b.is_routed_expert and b.projection == "down_proj"]
    gate = [b for b in p.architecture.blocks if b.is_routed_expert and b.projection == "gate_proj"]
    options = SolveOptions(solver="uniform", baseline=BaselineOptions(uniform_format="int3_g64"))
    plan = optimize(p, budget_of(10**9), None, options)
    assert {plan.formats[b.name] for b in gate} == {"int3_g64"}
    assert {plan.formats[b.name] for b in down} == {"int3_g80"}
    # bytes: a [256, 80] down_proj in int3_g80 is 256 rows x (ceil(80 * 3 / 8) = 30 codes + 1 group x 4) = 8,704
    assert block_bytes(down[0], "int3_g80") == 256 * (30 + 4) == 8704


@pytest.mark.parametrize("target", [Target.HF, Target.LLAMACPP])
def test_greedy_keeps_the_original_top_k(target: Target) -> None:
    # top-4 of 8 experts: greedy keeps >= 4 per layer at k = 4; a budget below "all 8 in their smallest
    # formats" makes it prune, never lower k
    p = synthetic_profile(seed=4, **ARCH)
    fo = FormulationOptions(target=target)
    _, smallest_all, _ = sizes(p, fo)
    budget = budget_of(smallest_all - 1)
    plan = optimize(p, budget, fo, SolveOptions(solver="greedy"))
    assert all(lp.top_k == m.top_k for lp, m in zip(plan.layers, p.architecture.moe_layers))
    assert all(4 <= len(lp.kept_experts) < 8 for lp in plan.layers)


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("target", [Target.HF, Target.LLAMACPP])
def test_budget_too_small_for_a_baseline(name: str, target: Target) -> None:
    p = synthetic_profile(seed=6, **GROUPED)
    fo = FormulationOptions(target=target)
    lo, smallest_all, _ = sizes(p, fo)
    budget = budget_of(lo)  # the ILP's smallest plan fits exactly: routes to k = 1 with 2 experts per group
    assert optimize(p, budget, fo, SolveOptions(time_limit=30)).bytes.total <= budget.available
    assert lo < smallest_all
    with pytest.raises(InfeasibleError, match=f"baseline {name} cannot fit the budget") as err:
        optimize(p, budget, fo, SolveOptions(solver=name))
    if name != "uniform":  # uniform states its own smallest plan (test_uniform_states_its_own_smallest_size)
        assert err.value.min_bytes == lo + sum(RESERVES.values())
    assert run_baseline(name, build_instance(p, budget, dataclasses.replace(fo, presolve=False))) is None


# ----------------------------------------------------------------------------------- regressions of fixed bugs
# sequential sizes each group for ceil(r E / G) experts, then raises k to --min-top-k without checking that the
# TG selected groups still hold k: 8 experts in 2 groups, TG = 1, top-4, --min-top-k 4, r = 0.75 -> 3 per group,
# k = 4 > 1 * 3, and optimize() raises "solver sequential returned a plan that violates: (3) selected groups hold
# k experts" (CLI exit 1). Expected: m >= ceil(min_top_k / TG) per group, i.e. 4 per group here, k = 4.
def test_sequential_respects_min_top_k_under_groups() -> None:
    p = synthetic_profile(seed=1, **GROUPED)
    fo = FormulationOptions(min_top_k=4)
    plan = optimize(p, all_experts_budget(p, fo, 0.5), fo, SolveOptions(solver="sequential"))
    for lp in plan.layers:
        assert lp.top_k == 4 and len(lp.kept_experts) == 8


# The ILP's reported optimum must never lose to a baseline. On this synthetic profile (natural scale: block costs
# ~1e-6 nats) HiGHS, run on the unscaled objective, stops at a plan 1.9% worse than the sequential baseline's and
# calls it optimal with gap 0 (see test_formulation's objective-unit tests).
def test_ilp_never_loses_to_a_baseline_at_natural_scale() -> None:
    arch = dict(num_layers=3, num_experts=4, top_k=4, hidden=256, expert_inter=64, dense_inter=256, vocab=256)
    p = synthetic_profile(seed=39, **arch)
    fo = FormulationOptions(target=Target.LLAMACPP, min_experts=0.25, min_top_k=2)
    lo, _, hi = sizes(p, fo)
    budget = budget_of(lo + 0.8135 * (hi - lo))
    seq = optimize(p, budget, fo, SolveOptions(solver="sequential", baseline=BaselineOptions(retain_ratio=1.0)))
    ilp = optimize(p, budget, fo, EXACT)
    assert ilp.solve.objective <= seq.solve.objective
    assert ilp.solve.bound <= seq.solve.objective
