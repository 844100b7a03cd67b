"""From (profile, budget, options) to a :class:`~optimizer.plan.Plan`: the one entry point of the optimizer.

``optimize(profile, budget, formulation, solve_options)``:

1. :func:`build_instance` validates everything cheap first (formats, top-k bounds, minimum experts), then
   builds the arrays; :func:`build_milp` turns them into the solver-agnostic model.
2. Every solver comes from one registry (:mod:`optimizer.solvers.registry`) and declares the constraints it
   honours; a solve that sets another is refused (:class:`InputError`). A baseline (``uniform``, ``greedy``,
   ``sequential``, ``llamacpp_mix``) answers directly. A MILP backend is, by default, *accelerated*: the
   Lagrangian decomposition gives a plan and a proven bound in milliseconds; if their gap is within ``rel_gap``
   the plan is certified without calling the backend, otherwise the backend runs warm-started from that plan
   and the better bound of the two is reported.
3. The decisions are checked against every row of the model and written out as a plan whose bytes are
   recomputed from the exact byte model. The plan's status is derived once, by :func:`plan_status`, from how
   the search stopped (a :class:`~optimizer.solvers.base.Termination`), the objective and the best proven bound.

``time_limit`` covers all of it, from ``started`` (the caller's clock, e.g. before loading the profile) or the
call: every step gets the one deadline (the Lagrangian bisection, the tied knapsack and the baselines look at
the clock; backends get what is left and are stopped at it, in a child process where they would overrun).
When it binds, the best plan so far is returned as ``feasible`` with a message saying the limit was reached;
with no plan by then, :class:`SolverError` ("no plan within the time limit").
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import NoReturn

import numpy as np

from .baselines import Baseline, BaselineOptions, run_baseline_until
from .budget import Budget, format_bytes
from .byte_model import block_bytes
from .errors import InfeasibleError, InputError, SolverError
from .formulation.constraints import build_milp
from .formulation.decisions import Decisions, check_decisions, from_vector, to_vector
from .formulation.decomposition import applicable, lagrangian, min_weight_bytes
from .formulation.instance import FormulationOptions, Instance, build_instance
from .formulation.speed import fastest_read, speed_bound, speed_plan
from .formulation.tied import applicable as tied_applicable
from .formulation.tied import tied_exact
from .plan import LayerPlan, Plan, PlanBytes, SolveRecord, SolveStatus, Target
from .profile import Profile
from .solvers.base import Solver, SolverOptions, Termination, relative_gap
from .solvers.registry import BACKENDS, get_backend, get_solver

_FINISH_SECONDS = 0.5  # most of the time limit kept for checking and writing the plan after the search


@dataclass(frozen=True)
class SolveOptions:
    solver: str = "highs"
    time_limit: float | None = 60.0  # seconds for the whole solve: model build, heuristics and backend
    rel_gap: float = 1e-4
    threads: int = 1
    seed: int = 0
    accelerate: bool = True  # Lagrangian warm start and certificate before the MILP
    reproducible: bool = False  # leave wall-clock seconds out of the plan, so reruns are byte-identical
    baseline: BaselineOptions = BaselineOptions()
    # time.perf_counter() at which the time limit starts (a caller that loads the profile first passes the time
    # before loading it); None: when optimize() is called
    started: float | None = None
    # the --device that replaced the profile's device section (recorded in the plan's options); None: the profile's
    device: str | None = None


#: Plan status of a search that ended without a plan (no plan.json is written for these; errors are raised).
_NO_PLAN = {Termination.INFEASIBLE: SolveStatus.INFEASIBLE, Termination.NO_SOLUTION: SolveStatus.NO_SOLUTION,
            Termination.ERROR: SolveStatus.ERROR}


def plan_status(termination: Termination, objective: float | None, bound: float | None,
                rel_gap: float) -> SolveStatus:
    """The plan's status from how the search stopped: ``optimal`` only when a proven bound lies within
    ``rel_gap`` of the objective (whatever the solver called its stop), ``feasible`` for any other plan, and the
    matching status when the search ended without a plan."""
    if not termination.has_solution:
        return _NO_PLAN[termination]
    gap = relative_gap(objective, bound)
    return SolveStatus.OPTIMAL if gap is not None and gap <= rel_gap + 1e-12 else SolveStatus.FEASIBLE


def requested_constraints(formulation: FormulationOptions) -> list[str]:
    """The :data:`~optimizer.solvers.base.CONSTRAINTS` a solve under ``formulation`` must meet."""
    out = ["budget", "target"]
    if formulation.min_experts > 0:
        out.append("min_experts")
    if formulation.min_top_k > 1:
        out.append("min_top_k")
    if formulation.min_tokens_per_s is not None:
        out.append("min_tokens_per_s")
    return out


def check_supported(solver: Solver, formulation: FormulationOptions) -> None:
    """:class:`InputError` when ``formulation`` sets a constraint ``solver`` does not honour (a baseline and
    ``--min-tokens-per-s``), naming the flag and the solvers that honour it."""
    missing = solver.unhonoured(requested_constraints(formulation))
    if not missing:
        return
    flags = ", ".join("--" + c.replace("_", "-") for c in missing)
    able = [name for name, cls in BACKENDS.items() if not cls.unhonoured(missing)]
    kind = "a heuristic baseline" if not solver.proves_bound else "a solver"
    use = ", ".join(able[:-1]) + " or " + able[-1] if len(able) > 1 else "".join(able)
    raise InputError(f"--solver {solver.name}: {kind} that does not honour {flags}, so its plan could miss "
                     f"{'it' if len(missing) == 1 else 'them'}; use {use}")


def optimize(profile: Profile, budget: Budget, formulation: FormulationOptions | None = None,
             options: SolveOptions | None = None) -> Plan:
    """Solve and return a plan; raises InfeasibleError (with the smallest achievable bytes) or SolverError.

    ``options.time_limit`` covers the whole call. When it binds, the best plan found by then is returned with
    status ``feasible`` and a message saying so; with no plan by then, SolverError ("no plan within the time
    limit").
    """
    formulation = formulation or FormulationOptions()
    options = options or SolveOptions()
    t0 = time.perf_counter()
    deadline = _deadline(options, t0)
    solver = get_solver(options.solver)  # unknown or missing solver: fail before the heavy work
    check_supported(solver, formulation)
    # dominance presolve only helps the exact methods
    presolve = formulation.presolve and solver.presolve
    inst = build_instance(profile, budget, FormulationOptions(**{**formulation.__dict__, "presolve": presolve}))
    model, variables = build_milp(inst)
    build_seconds = time.perf_counter() - t0
    info: dict = {"build_seconds": build_seconds, "variables": model.num_vars, "rows": model.num_rows,
                  "dominated_pairs_removed": inst.removed_pairs}
    if isinstance(solver, Baseline):
        d, stop, objective, bound, message = _solve_baseline(solver, inst, options, deadline)
    else:
        d, stop, objective, bound, message = _solve_exact(inst, model, variables, options, info, deadline)
    violated = check_decisions(inst, model, variables, d)
    if violated:
        raise SolverError(f"solver {options.solver} returned a plan that violates: {', '.join(violated)}")
    seconds = time.perf_counter() - t0
    info["seconds_total"] = seconds
    status = plan_status(stop, objective, bound, options.rel_gap)
    return _to_plan(inst, d, options, status, objective, bound, seconds, message, info)


def _deadline(options: SolveOptions, t0: float) -> float | None:
    """The ``time.perf_counter()`` instant by which the search must stop: the time limit, less a moment
    (5%, at most 0.5 s) to check the plan and write it out."""
    if options.time_limit is None:
        return None
    limit = float(options.time_limit)
    return (t0 if options.started is None else options.started) + limit - min(_FINISH_SECONDS, 0.05 * limit)


def _no_plan_in_time(options: SolveOptions, detail: str) -> SolverError:
    return SolverError(f"no plan within the time limit of {options.time_limit:g} s ({detail})")


def _solve_baseline(baseline: Baseline, inst: Instance, options: SolveOptions, deadline: float | None):
    run = baseline.run(inst, options.baseline, deadline)
    if run.status == Termination.NO_SOLUTION:
        raise _no_plan_in_time(options, f"baseline {options.solver} was stopped before it held a plan")
    if run.decisions is None and run.smallest is not None and options.solver == "uniform":
        _raise_uniform_infeasible(inst, *run.smallest)
    if run.decisions is None and run.smallest is not None:  # a recipe: its one plan does not fit
        name, weight_bytes = run.smallest
        need = weight_bytes + sum(inst.budget.reserves.values())
        _raise_infeasible(inst, f"baseline {options.solver} cannot fit the budget with its fixed rules: {name} "
                                f"needs {format_bytes(need)} ({need} bytes) including reserves "
                                f"(a joint solver can prune further)")
    if run.decisions is None:
        _raise_infeasible(inst, f"baseline {options.solver} cannot fit the budget with its fixed rules "
                                f"(a joint solver can prune further)")
    message = f"baseline {options.solver}"
    if not run.complete:
        message += f"; stopped at the time limit ({options.time_limit:g} s) before its upgrades were done"
    return run.decisions, run.status, run.decisions.objective(inst), None, message


@dataclass(frozen=True, eq=False)
class _Start:
    """What runs before the backend: a warm start, a Lagrangian bound, or a plan already certified optimal."""

    warm: Decisions | None = None
    bound: float | None = None
    source: str = ""  # where the warm start came from, for messages
    certified: tuple | None = None  # (decisions, Termination.OPTIMAL, objective, bound, message)


def _solve_exact(inst: Instance, model, variables, options: SolveOptions, info: dict, deadline: float | None):
    backend = get_backend(options.solver)
    start = _warm_start(inst, model, variables, options, info, deadline)
    if start.certified is not None:
        return start.certified
    warm, lag_bound = start.warm, start.bound
    if warm is not None and not backend.supports_warm_start:
        info["warm_start"] = "not supported by backend"
    remaining = None if deadline is None else deadline - time.perf_counter()
    if remaining is not None and remaining <= 0:
        if warm is None:
            raise _no_plan_in_time(options, f"{backend.name} had no time left to run")
        objective = warm.objective(inst)
        bound = None if lag_bound is None else min(lag_bound, objective)
        msg = f"time limit ({options.time_limit:g} s) reached before {backend.name} could run; the {start.source} plan"
        return warm, Termination.FEASIBLE, objective, bound, msg
    sopts = SolverOptions(time_limit=remaining, rel_gap=options.rel_gap, threads=options.threads, seed=options.seed)
    x0 = to_vector(inst, model, variables, warm) if warm is not None else None
    scale = _objective_scale(model, None if x0 is None else model.objective_value(x0))
    scaled = replace(model, c=model.c * scale, offset=model.offset * scale)
    result = backend.solve(scaled, sopts, warm_start=x0 if backend.supports_warm_start else None)
    if result.bound is not None:
        result = replace(result, bound=result.bound / scale)
    info["backend_seconds"] = result.seconds
    if result.status == Termination.INFEASIBLE:
        _raise_infeasible(inst, f"{backend.name} proved the constraints infeasible")
    stopped = result.status in (Termination.FEASIBLE, Termination.NO_SOLUTION)  # the only limit set is time
    candidates: list[tuple[float, Decisions]] = []
    if result.status.has_solution and result.x is not None:
        candidates.append((model.objective_value(result.x), from_vector(inst, variables, result.x)))
    if warm is not None:
        candidates.append((warm.objective(inst), warm))
    if not candidates:
        detail = f"{backend.name}: {result.status.value} after {result.seconds:.1f} s ({result.message})"
        raise _no_plan_in_time(options, detail) if stopped and deadline is not None else SolverError(detail)
    objective, d = min(candidates, key=lambda c: c[0])
    bounds = [b for b in (result.bound, lag_bound) if b is not None]
    bound = min(max(bounds), objective) if bounds else None
    msg = f"{backend.name}: {result.status.value}"
    if stopped and deadline is not None:
        msg += f" at the time limit ({options.time_limit:g} s)"
        if d is warm:
            msg += f"; kept the {start.source} plan"
    if lag_bound is not None:
        msg += " (warm start and bound from the Lagrangian decomposition)"
    # the plan is the better of the backend's point and the warm start: it stopped with a solution either way
    stop = result.status if result.status.has_solution else Termination.FEASIBLE
    return d, stop, objective, bound, msg


def _warm_start(inst: Instance, model, variables, options: SolveOptions, info: dict, deadline: float | None) -> _Start:
    """The Lagrangian certificate or warm start (``hf``), the tied knapsack's (``llamacpp``) or greedy."""
    if options.accelerate and applicable(inst):
        lr = lagrangian(inst, options.rel_gap, deadline=deadline)
        if lr is None:
            _raise_infeasible(inst, "no plan fits the budget")
        info.update(lagrangian_seconds=lr.seconds, lagrangian_evaluations=lr.evaluations,
                    lagrangian_gap=lr.gap, lagrangian_multiplier=lr.multiplier)
        if lr.stopped:
            info["lagrangian_stopped_by_time_limit"] = True
        if lr.gap <= options.rel_gap:
            msg = (f"certified by the Lagrangian bound (gap {lr.gap:.2e} <= {options.rel_gap:.0e}); "
                   f"{get_backend(options.solver).name} not needed")
            return _Start(certified=(lr.decisions, Termination.OPTIMAL, lr.objective, lr.bound, msg))
        return _Start(lr.decisions, lr.bound, "Lagrangian")
    if options.accelerate and tied_applicable(inst):
        if inst.options.min_tokens_per_s is not None:
            _check_reachable(inst)
        tied = tied_exact(inst, options.rel_gap, deadline=deadline)
        if tied is None:
            if deadline is not None and time.perf_counter() >= deadline:
                return _Start()
            if inst.options.min_tokens_per_s is not None:
                _raise_infeasible(inst, "no tied plan (one expert count, one k) fits the budget and reads little "
                                        "enough per token for --min-tokens-per-s")
            _raise_infeasible(inst, "no plan fits the budget")
        info.update(tied_seconds=round(tied.seconds, 3), tied_evaluations=tied.evaluations, tied_gap=tied.gap,
                    tied_experts_per_group=tied.experts_per_group)
        if tied.stopped:
            info["tied_stopped_by_time_limit"] = True
        if tied.gap <= options.rel_gap:
            msg = (f"certified by the tied knapsack bound (gap {tied.gap:.2e} <= {options.rel_gap:.0e}); "
                   f"{get_backend(options.solver).name} not needed")
            return _Start(certified=(tied.decisions, Termination.OPTIMAL, tied.objective, tied.bound, msg))
        return _Start(tied.decisions, tied.bound, "tied knapsack")
    if options.accelerate and inst.options.target == Target.HF and inst.options.min_tokens_per_s is not None:
        return _speed_start(inst, model, variables, options, info, deadline)
    if options.accelerate:
        greedy = run_baseline_until("greedy", inst, deadline=deadline).decisions
        if greedy is not None and not check_decisions(inst, model, variables, greedy):
            return _Start(greedy, None, "greedy")
    return _Start()


def _check_reachable(inst: Instance) -> None:
    """Refuse a ``--min-tokens-per-s`` floor above what any plan reaches, naming the speed it can reach."""
    fastest = fastest_read(inst)
    reachable = inst.tokens_per_s(fastest)
    if fastest > inst.read_limit:
        raise InfeasibleError(f"infeasible: no plan reads little enough per token for --min-tokens-per-s "
                              f"{inst.options.min_tokens_per_s:g}: even top-k {inst.min_top_k} everywhere with every "
                              f"block at its fewest-read format reaches at most {reachable:.4g} tokens/s on this "
                              "device (the profile's bandwidth and format throughput)")


def _speed_start(inst: Instance, model, variables, options: SolveOptions, info: dict,
                 deadline: float | None) -> _Start:
    """``--min-tokens-per-s`` (hf): the plan of :func:`~optimizer.formulation.speed.speed_plan`, bounded by the
    unconstrained Lagrangian bound and, where the floor binds, :func:`~optimizer.formulation.speed.speed_bound`
    (both relaxations, so valid); a floor above what any plan reaches is refused with that speed."""
    _check_reachable(inst)
    free = replace(inst, options=replace(inst.options, min_tokens_per_s=None))
    relaxed = lagrangian(free, options.rel_gap, deadline=deadline)
    if relaxed is None:
        _raise_infeasible(inst, "no plan fits the budget")
    t0 = time.perf_counter()
    warm = speed_plan(inst, options.rel_gap, deadline=deadline, start=relaxed)
    info.update(speed_heuristic_seconds=round(time.perf_counter() - t0, 3))
    if warm is not None and check_decisions(inst, model, variables, warm):
        warm = None  # a bug guard: the heuristic's plan must satisfy the MILP's rows
    if warm is None:
        return _Start(None, relaxed.bound, "speed heuristic")
    bound = relaxed.bound
    first_gap = relative_gap(warm.objective(inst), bound)
    if first_gap is None or first_gap > options.rel_gap:  # the floor binds: a bound that knows it
        bound = max(bound, speed_bound(inst, relaxed.multiplier, deadline=deadline))
        info.update(speed_bound=bound)
    gap = relative_gap(warm.objective(inst), bound)
    info.update(speed_heuristic_gap=gap)
    if gap is not None and gap <= options.rel_gap:  # the floor does not bind: the Lagrangian plan is fast enough
        return _Start(certified=(warm, Termination.OPTIMAL, warm.objective(inst), bound,
                                 "certified by the Lagrangian bound of the problem without the speed row"))
    return _Start(warm, bound, "speed heuristic")


def _objective_scale(model, estimate: float | None) -> float:
    """A power of two to multiply the objective by before a backend sees it (the bound is scaled back).

    Costs are nats per block (often 1e-9..1e-5), and solvers' absolute tolerances would treat them as zero.
    Without an estimate of the optimum the largest cost is brought to ~1. With one (the warm start's
    objective) the *objective* is brought to [0.5, 1): the objective is a sum of large terms that nearly
    cancel (an offset of kept-expert costs minus savings), and HiGHS ignores improvements below its
    feasibility tolerance (1e-6) in absolute terms, which let it stop R2's 4 MB instance at a 2.3e-4
    relative gap while reporting "optimal". Costs are never scaled beyond 2^20 over the largest-cost scale.
    """
    cmax = float(np.abs(model.c).max(initial=0.0))
    base = 2.0 ** -math.frexp(cmax)[1] if cmax > 0 else 1.0
    if estimate is None or not math.isfinite(estimate) or estimate == 0.0:
        return base
    return min(2.0 ** -math.frexp(abs(estimate))[1], base * 2.0 ** 20)


def _raise_infeasible(inst: Instance, why: str) -> NoReturn:
    need = min_weight_bytes(inst) + sum(inst.budget.reserves.values())
    extra = ""
    if inst.options.min_tokens_per_s is not None:
        extra = f" (or the speed target of {inst.options.min_tokens_per_s:g} tokens/s cannot be met)"
    raise InfeasibleError(
        f"infeasible: {why}{extra}. The smallest plan the constraints allow needs {format_bytes(need)} ({need} bytes) "
        f"including reserves; the budget is {format_bytes(inst.budget.total)}.", min_bytes=need,
    )


def _raise_uniform_infeasible(inst: Instance, fmt: str, weight_bytes: int) -> NoReturn:
    """The uniform baseline's own smallest plan (every block in its smallest format, nothing pruned) does not fit."""
    need = weight_bytes + sum(inst.budget.reserves.values())
    joint = min_weight_bytes(inst) + sum(inst.budget.reserves.values())
    raise InfeasibleError(
        f"infeasible: baseline uniform cannot fit the budget with its fixed rules (no pruning, original top-k, one "
        f"format everywhere): its smallest plan, every block in {fmt} (or the next larger format it takes), needs "
        f"{format_bytes(need)} ({need} bytes) including reserves; the budget is {format_bytes(inst.budget.total)}, "
        f"so uniform needs --budget {need} or more. A joint solver can prune experts: its smallest plan needs "
        f"{format_bytes(joint)}.", min_bytes=need,
    )


def _to_plan(inst: Instance, d: Decisions, options: SolveOptions, status: SolveStatus, objective: float,
             bound: float | None, seconds: float, message: str, info: dict) -> Plan:
    profile = inst.profile
    arch = profile.architecture
    formats: dict[str, str] = {}
    by_kind: dict[str, int] = {}
    chosen_idx = np.flatnonzero(d.chosen)
    chosen_format = dict(zip(inst.pair_block[chosen_idx].tolist(),
                             [inst.formats[f] for f in inst.pair_format[chosen_idx].tolist()]))
    chosen_bytes = dict(zip(inst.pair_block[chosen_idx].tolist(), inst.pair_bytes[chosen_idx].tolist()))
    layers = []
    kept_by_layer: dict[int | None, tuple[set[int], int]] = {}
    for i, m in enumerate(arch.moe_layers):
        ids = inst.layer_first_expert[i] + np.arange(m.num_experts)
        kept = tuple(int(e) for e in np.flatnonzero(d.keep[ids]))
        kept_by_layer[m.index] = (set(kept), m.num_experts)
        layers.append(LayerPlan(m.index, kept, int(d.top_k[i])))
    for b, block in enumerate(arch.blocks):
        if block.is_routed_expert and block.expert not in kept_by_layer[block.layer][0]:
            continue
        fmt = chosen_format[b] if block.quantizable else block.fixed_format
        assert fmt is not None  # a block that is not quantizable has its fixed format
        nbytes = chosen_bytes[b] if block.quantizable else block_bytes(block, fmt)
        if (block.kind.value == "router" and block.layer in kept_by_layer
                and block.shape[0] == kept_by_layer[block.layer][1]):
            nbytes = nbytes // block.shape[0] * len(kept_by_layer[block.layer][0])
        formats[block.name] = fmt
        by_kind[block.kind.value] = by_kind.get(block.kind.value, 0) + nbytes
    total = sum(by_kind.values())
    predicted = {"loss_increase": objective, "bytes_read_per_token": float(_bytes_read(inst, d))}
    predicted["decode_tokens_per_s"] = profile.device.tokens_per_s(predicted["bytes_read_per_token"])
    if (profile.prediction is not None and objective is not None and inst.options.objective == "predicted_loss"
            and inst.options.objective_options.prune_curve):  # the objective the map was fitted to
        predicted["kl"] = profile.prediction.kl(objective)
    opts = {
        "objective": inst.options.objective, "target": inst.options.target.value, "formats": list(inst.formats),
        "min_experts": inst.options.min_experts, "min_top_k": inst.options.min_top_k,
        "min_tokens_per_s": inst.options.min_tokens_per_s, "objective_options": asdict(inst.options.objective_options),
        "time_limit": options.time_limit, "rel_gap": options.rel_gap, "threads": options.threads, "seed": options.seed,
        "accelerate": options.accelerate,
    }
    if options.device is not None:
        opts["device"] = {"name": options.device, "bandwidth_bytes_per_s": profile.device.memory_bandwidth_bytes_per_s}
    if not options.reproducible:
        opts["timing"] = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in info.items()}
    else:
        opts["model_size"] = {k: info[k] for k in ("variables", "rows", "dominated_pairs_removed")}
    record = SolveRecord(
        solver=options.solver, formulation=inst.options.objective, status=status, objective=objective, bound=bound,
        gap=relative_gap(objective, bound), seconds=None if options.reproducible else seconds,
        profile_hash=profile.hash, options=opts, message=message,
    )
    pbytes = PlanBytes(total=total, by_kind=by_kind, budget=inst.budget.total, reserves=dict(inst.budget.reserves))
    return Plan(profile.model.name, arch.family, arch.shape_hash(), inst.options.target, tuple(layers), formats,
                pbytes, record, predicted)


def _bytes_read(inst: Instance, d: Decisions) -> float:
    """Expected bytes read per decoded token: non-expert weights, k_i average kept experts, the KV cache."""
    chosen = np.flatnonzero(d.chosen)
    owner = inst.block_owner[inst.pair_block[chosen]]
    nonexpert = (float(inst.pair_read[chosen[owner < 0]].sum()) + inst.fixed_read
                 + float(inst.router_bytes[d.keep].sum()))
    per_expert = np.bincount(owner[owner >= 0], weights=inst.pair_read[chosen[owner >= 0]], minlength=inst.num_experts)
    experts = 0.0
    for i, k in enumerate(d.top_k):
        ids = inst.layer_first_expert[i] + np.arange(inst.layer_experts[i])
        kept = ids[d.keep[ids]]
        experts += k * float(per_expert[kept].mean()) if len(kept) else 0.0
    return nonexpert + experts + inst.budget.reserves.get("kv_cache", 0)
