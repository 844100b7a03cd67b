"""``python -m profiling refine PROFILE --model DIR --budget B -o PLAN``: measure plans before trusting them.

The profile's costs are single-block and single-expert effects; on pretrained weights they do not add up once
routing flips (docs/profiling.md, R3), so its optimum can lose to plain uniform quantization. This closed
loop lets the ILP propose and measurement decide:

1. **Candidates.** The baselines at the budget (``uniform`` in the largest format that fits, ``greedy``,
   ``sequential``, ``quantize_only``: the ILP with every expert and the original k, ``llamacpp``: the ILP
   with llama.cpp's ties) and the ILP's plans from the profile under ``predicted_loss`` and the proxy
   objectives ``importance`` and ``routing_mass``, each solved by :func:`optimizer.solve.optimize` (the
   optimizer stays pure). For a profile ``calibrate`` made, also the ILP's plan from the single-effect
   profile it came from (``ilp (source)``, when that file is still there unchanged): where single effects
   already predict whole plans, calibrating them costs more than it corrects (R1), and measurement decides.
2. **Measure.** Each new plan is applied in memory all at once (top-k, masked experts, fake-quantized blocks,
   as ``profiling validate`` does) and its mean per-token KL(original || plan) is measured on the profile's
   calibration windows (:meth:`profiling.engine.Engine.evaluate_full`).
3. **Correct.** The profile's prediction of a plan splits into three sums: format costs F, prune costs P and
   top-k costs K. Nonnegative least squares fits ``KL ~ c + a_F F + a_P P + a_K K`` over every plan measured
   so far (``c`` absorbs the routing-flip floor that single effects all carry); the corrected profile has
   ``sensitivity``, ``prune_cost`` and ``topk_cost`` scaled by ``a_F``, ``a_P``, ``a_K``.
4. **Re-solve.** The ILP solves the corrected profile, and the same profile with pruning priced 2x up and
   2x down (pruning is what single effects misprice most); plans not seen before are measured. Steps 3-4
   repeat for ``--rounds`` rounds or until no new plan comes up.

The plan handed over (``-o``) is the best *measured* one among all rounds and the baselines, so it is never
worse on calibration text than any baseline measured at that budget; its ``solve.message`` says which it
was. ``--profile-out`` writes the corrected profile; ``--log`` the record of every measured plan (method,
multipliers, predicted and measured KL and NLL, bytes). Evaluate the handed-over plan on held-out text with
``python -m runtime eval`` or the sweeps (method ``refine``).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from scipy.optimize import nnls

from optimizer.budget import Budget
from optimizer.errors import InfeasibleError, InputError, MoeccError
from optimizer.formulation.instance import FormulationOptions
from optimizer.formulation.objectives import build_objective
from optimizer.plan import Plan, Target, plan_to_json
from optimizer.profile import Profile, Sensitivity, TopkCost, load_profile, with_costs
from optimizer.solve import SolveOptions, optimize

from .meter import PlanMeter

DEFAULT_ROUNDS = 3
PRUNE_PROBES = (2.0, 0.5)  # each round also solves with pruning priced this much up and down
PROPOSING_OBJECTIVES = ("importance", "routing_mass")  # measured once beside the predicted_loss ILP
#: calibration tokens the experiments measure candidates on (more than most profiles used: less selection noise)
DEFAULT_REFINE_TOKENS = 4096


@dataclass(frozen=True)
class Multipliers:
    """Scales of the profile's format, prune and top-k costs (and the fitted floor ``c``)."""

    formats: float = 1.0
    prune: float = 1.0
    topk: float = 1.0
    floor: float = 0.0

    def to_json(self) -> dict[str, float]:
        return {"formats": self.formats, "prune": self.prune, "topk": self.topk, "floor": self.floor}


@dataclass
class Measured:
    """One plan measured on calibration text."""

    name: str
    plan: Plan
    parts: tuple[float, float, float]  # (F, P, K) under the original profile
    kl: float
    dnll: float
    multipliers: Multipliers | None = None

    def row(self) -> dict[str, Any]:
        return {"name": self.name, "plan_sha256": plan_hash(self.plan), "bytes": self.plan.bytes.total,
                "predicted_parts": dict(zip(("formats", "prune", "topk"), self.parts)),
                "predicted": float(sum(self.parts)), "measured_kl": self.kl, "measured_nll": self.dnll,
                "kept_experts": sum(len(lp.kept_experts) for lp in self.plan.layers),
                "mean_top_k": float(np.mean([lp.top_k for lp in self.plan.layers])) if self.plan.layers else None,
                **({"multipliers": self.multipliers.to_json()} if self.multipliers else {})}


@dataclass
class RefineResult:
    best: Measured
    measured: list[Measured]
    multipliers: Multipliers
    profile: Profile
    seconds: float
    tokens: int
    rounds: int
    log: list[str] = field(default_factory=list)


def plan_hash(plan: Plan) -> str:
    """sha256 of what a plan decides (layers and formats), not of its solve record."""
    doc = plan_to_json(plan)
    key = {"layers": doc["layers"], "formats": doc["formats"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def scaled_profile(profile: Profile, m: Multipliers) -> Profile:
    """``profile`` with its format, prune (singles and curves) and top-k costs multiplied (see the module
    docstring)."""
    experts = profile.experts
    prune = None if experts.prune_cost is None else tuple(np.asarray(v) * m.prune for v in experts.prune_cost)
    curves = None if experts.prune_curve is None else tuple(
        None if c is None else replace(c, cost=np.asarray(c.cost) * m.prune) for c in experts.prune_curve)
    sens = Sensitivity(profile.sensitivity.formats, np.asarray(profile.sensitivity.values) * m.formats,
                       profile.sensitivity.measurement)
    topk = TopkCost(tuple(np.asarray(v) * m.topk for v in profile.topk_cost.values), profile.topk_cost.measurement)
    tag = hashlib.sha256(json.dumps(m.to_json(), sort_keys=True).encode()).hexdigest()[:12]
    return with_costs(profile, experts=replace(experts, prune_cost=prune, prune_curve=curves), sensitivity=sens,
                      topk_cost=topk, hash=f"{profile.hash}+refined:{tag}" if profile.hash else "")


def plan_parts(profile: Profile, plan: Plan) -> tuple[float, float, float]:
    """(format, prune, top-k) sums of the ``predicted_loss`` objective of ``profile`` for ``plan``."""
    terms = build_objective(profile, "predicted_loss")
    arch = profile.architecture
    col = {f: j for j, f in enumerate(profile.sensitivity.formats)}
    index = {b.name: i for i, b in enumerate(arch.blocks)}
    prune = topk = 0.0
    for i, m in enumerate(arch.moe_layers):
        lp = plan.layer(m.index)
        pruned = sorted(set(range(m.num_experts)) - set(lp.kept_experts))
        prune += float(np.sum(np.asarray(terms.drop[i])[pruned])) if pruned else 0.0
        if terms.prune_count is not None:
            prune += float(terms.prune_count[i][len(pruned)])
        topk += float(terms.topk[i][lp.top_k - 1])
    fmt = 0.0
    for name, f in plan.formats.items():
        b = index[name]
        if arch.blocks[b].quantizable and f in col:
            fmt += float(terms.format_cost[b, col[f]])
    return fmt, prune, topk


def fit_multipliers(measured: list[Measured]) -> Multipliers:
    """Nonnegative least squares of measured KL on (1, F, P, K); a column that never varies keeps scale 1."""
    a = np.array([[1.0, *m.parts] for m in measured])
    y = np.array([m.kl for m in measured])
    used = [0] + [j for j in (1, 2, 3) if np.ptp(a[:, j]) > 0 or a[:, j].any()]
    coef, _ = nnls(a[:, used], y)
    full = np.ones(4)
    full[0] = 0.0
    for j, c in zip(used, coef):
        full[j] = c
    scale = [max(float(v), 1e-6) for v in full[1:]]  # a zero scale would make that lever free
    return Multipliers(formats=scale[0], prune=scale[1], topk=scale[2], floor=float(full[0]))


def _solve(profile: Profile, budget: Budget, solver: str = "highs", objective: str = "predicted_loss",
           **formulation: Any) -> Plan | None:
    try:
        return optimize(profile, budget, FormulationOptions(objective=objective, **formulation),
                        SolveOptions(solver=solver, time_limit=60.0, reproducible=True))
    except InfeasibleError:
        return None


def baseline_plans(profile: Profile, budget: Budget) -> dict[str, Plan]:
    """The baselines the handed-over plan must not lose to (those that fit the budget)."""
    arch = profile.architecture
    keep_all = float(min(m.num_experts for m in arch.moe_layers))
    original_k = min(m.top_k for m in arch.moe_layers)
    plans = {"uniform": _solve(profile, budget, "uniform"), "greedy": _solve(profile, budget, "greedy"),
             "sequential": _solve(profile, budget, "sequential"),
             "llamacpp": _solve(profile, budget, target=Target.LLAMACPP)}
    if len({m.num_experts for m in arch.moe_layers}) == 1:
        plans["quantize_only"] = _solve(profile, budget, min_experts=keep_all, min_top_k=original_k)
    return {name: p for name, p in plans.items() if p is not None}


def refine(profile: Profile, model_dir: str | Path, budget: Budget, rounds: int = DEFAULT_ROUNDS,
           data: str = "english:calibration", tokens: int = 2048, window: int = 256, progress: bool = False,
           say: Callable[[str], None] = lambda s: None,
           alternatives: Mapping[str, Profile] | None = None) -> RefineResult:
    """The closed loop of the module docstring; raises :class:`InfeasibleError` if nothing fits the budget.
    ``alternatives``: other profiles of the same model (by name) whose ILP plans are measured as candidates too,
    e.g. the single-effect profile a calibrated one came from (:func:`calibration_source`)."""
    if rounds < 0:
        raise InputError(f"--rounds: must be >= 0, got {rounds}")
    for label, alt in (alternatives or {}).items():  # before any measuring
        if alt.architecture.shape_hash() != profile.architecture.shape_hash():
            raise InputError(f"refine: the {label} profile is of another model than the profile refined")
    t0 = time.perf_counter()
    meter = PlanMeter(profile, Path(model_dir), data, tokens, window, progress)
    measured: list[Measured] = []
    seen: set[str] = set()

    def take(name: str, plan: Plan | None, mult: Multipliers | None = None) -> None:
        if plan is None or plan_hash(plan) in seen:
            return
        seen.add(plan_hash(plan))
        kl, dnll = meter.measure(plan)
        measured.append(Measured(name, plan, plan_parts(profile, plan), kl, dnll, mult))
        say(f"{name}: {plan.bytes.total:,} B, predicted {sum(measured[-1].parts):.4g}, measured KL {kl:.4g}")

    for name, plan in baseline_plans(profile, budget).items():
        take(name, plan)
    take("ilp", _solve(profile, budget), Multipliers())
    for objective in PROPOSING_OBJECTIVES:  # the ILP proposes under the proxy objectives too
        try:
            take(f"ilp ({objective})", _solve(profile, budget, objective=objective))
        except InputError:  # the profile lacks what the objective needs (e.g. saliency)
            continue
    for label, alt in (alternatives or {}).items():
        take(f"ilp ({label})", _solve(alt, budget))
    if not measured:
        raise InfeasibleError(f"refine: no plan fits {budget.total:,} bytes")
    mult = Multipliers()
    done = 0
    for r in range(1, rounds + 1):
        done = r
        mult = fit_multipliers(measured)
        before = len(measured)
        for probe in (1.0, *PRUNE_PROBES):
            m = replace(mult, prune=mult.prune * probe)
            take(f"ilp round {r}" + ("" if probe == 1.0 else f" (prune x{probe:g})"),
                 _solve(scaled_profile(profile, m), budget), m)
        if len(measured) == before:
            break
    best = min(measured, key=lambda m: (m.kl, m.plan.bytes.total))
    note = (f"handed over by refine: '{best.name}', the lowest measured KL ({best.kl:.4g} nats/token on "
            f"{meter.engine.tokens:,} calibration tokens) of {len(measured)} measured plans")
    best.plan = replace(best.plan, solve=replace(best.plan.solve, message=note))
    return RefineResult(best, measured, mult, scaled_profile(profile, mult), time.perf_counter() - t0,
                        meter.engine.tokens, done)


def calibration_source(details: dict, profile_path: str | Path,
                       say: Callable[[str], None] = lambda s: None) -> dict[str, Profile]:
    """``{"source": profile}``: the single-effect profile a calibrated profile came from (``calibrate`` records its
    path and hash in the details file), read if it is still there unchanged; else ``{}`` (said)."""
    src = (details.get("calibration") or {}).get("source")
    if not isinstance(src, dict) or not isinstance(src.get("path"), str):
        return {}
    path = Path(src["path"])
    if not path.is_file():
        path = Path(profile_path).parent / path.name
    try:
        alt = load_profile(path)
    except (MoeccError, OSError) as exc:
        say(f"note: the calibration source {src['path']} is not readable ({exc}); not proposed")
        return {}
    if alt.hash != src.get("hash"):
        say(f"note: the calibration source {path} changed since calibration; not proposed")
        return {}
    return {"source": alt}


def run_refine(args) -> RefineResult:  # noqa: ANN001 - the argparse namespace of ``python -m profiling refine``
    """The CLI: read the profile and its calibration settings, refine, write the plan (and profile, log)."""
    from optimizer.budget import make_budget
    from optimizer.jsonio import read_json, write_json
    from optimizer.plan import save_plan
    from optimizer.profile import save_profile

    from .run import details_path

    profile = load_profile(args.profile)
    budget = make_budget(profile.architecture, args.budget, args.context, args.overhead)
    dpath = details_path(Path(args.profile))
    details = read_json(dpath)[0] if dpath.is_file() else {}
    data = args.data or details.get("data") or profile.experts.measurement.source or "english:calibration"
    tokens = args.max_tokens or max(details.get("tokens") or profile.experts.measurement.tokens or 0,
                                    DEFAULT_REFINE_TOKENS)
    alternatives = calibration_source(details, args.profile, say=print)
    for path in args.also:
        alternatives[f"--also {path}"] = load_profile(path)
    res = refine(profile, args.model, budget, args.rounds, data, tokens, args.window or details.get("window", 256),
                 progress=not args.no_progress, say=print, alternatives=alternatives)
    save_plan(res.best.plan, args.output)
    print(f"handed over '{res.best.name}' (measured KL {res.best.kl:.4g} nats/token on {res.tokens:,} tokens; "
          f"{len(res.measured)} plans measured in {res.seconds:.0f} s); multipliers {res.multipliers.to_json()}")
    print(f"wrote {args.output}")
    if args.profile_out:
        save_profile(res.profile, args.profile_out)
        print(f"wrote {args.profile_out}")
    if args.log:
        write_json(args.log, {"profile": str(args.profile), "model": str(args.model), "budget": budget.total,
                              "data": data, "tokens": res.tokens, "rounds": res.rounds, "seconds": res.seconds,
                              "multipliers": res.multipliers.to_json(), "handed_over": res.best.name,
                              "measured": [m.row() for m in res.measured]})
        print(f"wrote {args.log}")
    return res
