"""``python -m profiling run``: measure a transformers MoE and write ``profile.json`` (+ ``.details.json``).

Order of work (one reference pass, then perturbations; see ``docs/profiling.md``):

1. architecture from ``config.json`` (``optimizer.architectures``), formats checked against its shapes;
2. calibration windows; reference pass with router hooks (routing statistics, REAP saliency) and input
   second moments, then the importance-matrix proxy of every block x format;
3. measured prune cost of single experts, top-k cost per layer, sensitivity of single blocks;
4. proxy fitted to the measured sensitivities (per kind/projection group);
5. device throughput; profile assembled, written, checked by ``optimizer.profile.load_profile``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from optimizer.formats import (
    INT_GROUP_SIZES,
    LLAMACPP_DEFAULT_FORMATS,
    get_format,
    num_elements,
    stand_in_group,
)
from optimizer.model_spec import Architecture
from optimizer.plan import Target
from optimizer.profile import (
    Device,
    ExpertStats,
    Measurement,
    ModelInfo,
    Profile,
    Sensitivity,
    TopkCost,
    load_profile,
    save_profile,
)
from runtime.evaluate import tokenize

from .blocks import BlockRef, resolve_blocks
from .device import measure_device, peak_rss_bytes
from .engine import Engine
from .fit import apply_fit, fit_proxy, proxy_sentence
from .model_io import ProfilingError, Runner, load_text, release_freed_memory, token_windows
from .stats import Collector

SECTIONS = ("prune", "topk", "sensitivity", "device")
DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
AUTO_PRUNE_ALL = 512  # measure every expert when the model has at most this many routed experts
AUTO_PRUNE_PER_LAYER = 16
AUTO_BLOCKS_ALL = 600  # measure every block when the model has at most this many quantizable blocks
AUTO_BLOCKS_SAMPLE = 300
COST_TEXT = {
    "kl": "mean per-token KL(original || modified) in nats (the expected loss increase under the original model's "
          "predictions; the plain NLL increases of the same runs are in the details file)",
    "nll": "loss increase (mean NLL, nats/token, clipped at 0)",
}
QCACHE_LIMIT = 2 << 30  # keep fake-quantized weights from the proxy pass for the measurements below this size


@dataclass
class RunOptions:
    model: Path
    data: str = "english:calibration"
    output: Path = Path("profile.json")
    max_tokens: int = 4096
    window: int = 256
    batch_size: int = 8
    formats: Sequence[str] | None = None
    seed: int = 0
    streamed: bool = False
    method: str = "rtn"
    prune_per_layer: int | None = None  # None = automatic (all experts of small models)
    measure_blocks: int | None = None  # None = automatic (all blocks of small models)
    measure: Sequence[str] = SECTIONS
    state_budget_mib: int | None = None  # hidden states of perturbations propagated together (None: 128 / 512 streamed)
    cost: str = "kl"  # measured effect stored as prune cost / sensitivity and fitted by the proxy: kl or nll
    device_repeats: int = 5
    progress: bool = True
    resume: bool = False  # continue an interrupted run from its journal (profiling.journal)
    target: str = Target.HF.value  # whose formats are the default candidates: a Target value


@dataclass
class RunResult:
    profile: Profile
    details: dict
    profile_path: Path
    details_path: Path
    timings: dict = field(default_factory=dict)


def details_path(profile_path: Path) -> Path:
    name = profile_path.name
    for ext in (".json.gz", ".json"):
        if name.endswith(ext):
            return profile_path.with_name(name[: -len(ext)] + ".details.json")
    return profile_path.with_name(name + ".details.json")


def default_formats(arch: Architecture, target: str = Target.HF.value) -> list[str]:
    """The default candidates: for moecc's runtime (target ``hf``), int formats (bits 2,3,4,5,6,8) with the
    largest group size that stores the most quantizable parameters of this model, the same bits in the group of
    :func:`stand_in_group` for rows that group does not divide, plus BF16; for ``llamacpp``,
    the :data:`~optimizer.formats.LLAMACPP_DEFAULT_FORMATS` that store at least one quantizable block. Q4_0,
    Q5_0 and Q8_0 are then measured as llama.cpp stores them (gguf-py's quantizer), the K-quants through the
    smallest runtime int format of at least their bytes (:func:`runtime.quant.storage_format`, which says so)."""
    quant = [b for b in arch.blocks if b.quantizable]
    if target == Target.LLAMACPP.value:
        return [f for f in LLAMACPP_DEFAULT_FORMATS if any(get_format(f).admits(b.shape) for b in quant)]
    if target != Target.HF.value:
        raise ProfilingError(f"--target {target}: expected one of {', '.join(t.value for t in Target)}")

    def stored(g: int) -> int:
        return sum(num_elements(b.shape) for b in quant if b.shape[-1] % g == 0)

    group = max(sorted(INT_GROUP_SIZES, reverse=True), key=stored)
    groups = [group] + sorted({g for b in quant if b.shape[-1] % group and (g := stand_in_group(b.shape[-1]))},
                              reverse=True)
    return [f"int{b}_g{g}" for g in groups for b in DEFAULT_BITS] + ["BF16"]



def check_formats(arch: Architecture, names: Sequence[str]) -> list[str]:
    """Normalised candidate formats; refuses unknown names, formats no block (or the runtime) can take, and
    models with a quantizable block no candidate can store."""
    from runtime.quant import storage_format

    out = []
    for n in names:
        fmt = get_format(n)  # InputError for unknown names
        if fmt.name in out:
            raise ProfilingError(f"--formats: {fmt.name} given twice")
        out.append(fmt.name)
    quant = [b for b in arch.blocks if b.quantizable]
    for f in out:
        fmt = get_format(f)
        fits = [b for b in quant if fmt.admits(b.shape)]
        if not fits:
            rows = sorted({b.shape[-1] for b in quant})
            raise ProfilingError(f"--formats: {f} cannot store any block of this model (rows of {rows} elements, "
                                 f"{f} needs multiples of {fmt.block_elements})")
        for shape in sorted({tuple(b.shape) for b in fits}):
            storage_format(f, shape)  # InputError when the runtime cannot store it
    for b in quant:
        if not any(get_format(f).admits(b.shape) for f in out):
            raise ProfilingError(f"--formats: no candidate format can store block {b.name} (rows of {b.shape[-1]} "
                                 f"elements); add one that can, e.g. BF16")
    return out


def _check_model(arch: Architecture, model: torch.nn.Module) -> None:
    from runtime.moe import moe_layers

    found = {h.index: (h.num_experts, h.top_k) for h in moe_layers(model)}
    want = {m.index: (m.num_experts, m.top_k) for m in arch.moe_layers}
    if found != want:
        raise ProfilingError(f"MoE layers of the loaded model {found} differ from config.json's architecture {want}")


def _measured_rows(arch, effects, attr, default=math.nan) -> list[np.ndarray]:
    rows = [np.full(m.num_experts, default) for m in arch.moe_layers]
    for (i, e), eff in effects.items():
        rows[i][e] = getattr(eff, attr)
    return rows


@dataclass
class Effects:
    """What the perturbation passes measured (empty where ``--measure`` left a section out)."""

    prune: dict = field(default_factory=dict)
    prune_note: str = ""
    topk: dict = field(default_factory=dict)
    sens: dict = field(default_factory=dict)
    measured_refs: list[BlockRef] = field(default_factory=list)


@dataclass
class Table:
    """The sensitivity table and the fits behind its proxy cells."""

    values: np.ndarray
    fit: object
    wfit: object
    fitted: dict
    meas_nll: dict
    meas_kl: dict
    group_of: dict


def run_profile(opts: RunOptions) -> RunResult:
    """Profile ``opts.model``: inputs, reference pass, measured effects, sensitivity table, device, files."""
    from optimizer.architectures import load_architecture

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)
    _check_options(opts)
    arch = load_architecture(opts.model)
    formats = check_formats(arch, opts.formats or default_formats(arch, opts.target))
    text, source = load_text(opts.data)
    inputs, targets = token_windows(tokenize(opts.model, text), opts.max_tokens, opts.window)
    if int(inputs.max()) >= arch.vocab_size:
        raise ProfilingError(f"token id {int(inputs.max())} >= vocab_size {arch.vocab_size}: wrong tokenizer?")
    ntok = int(targets.numel())

    t = time.perf_counter()
    runner = Runner(opts.model, streamed=opts.streamed)
    _check_model(arch, runner.model)
    refs = resolve_blocks(arch, runner.model)
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    engine, collector, qcache = _reference_pass(opts, arch, runner, refs, formats, inputs, targets, source, ntok)
    timings["reference_pass"] = time.perf_counter() - t
    stats = [collector.layer_stats[m.index] for m in arch.moe_layers]
    effects = _measure_effects(opts, arch, engine, refs, formats, [s.routing_mass() for s in stats], rng, qcache,
                               timings)
    collector.cache = None
    table = _sensitivity_table(opts, arch, refs, formats, effects, collector)
    t = time.perf_counter()
    device = _device(opts, formats)
    timings["device"] = time.perf_counter() - t

    profile = _assemble(opts, arch, formats, source, ntok, stats, effects.prune, effects.prune_note, effects.topk,
                        table.values, effects.measured_refs, refs, table.fit, device)
    out = Path(opts.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = save_profile(profile, out)
    load_profile(out)  # the contract's own checks
    timings["total"] = time.perf_counter() - t_start
    details = _details(opts, arch, out, digest, source, ntok, int(inputs.shape[1]), formats, engine, timings, refs,
                       effects, table, collector)
    dpath = details_path(out)
    from optimizer.jsonio import write_json

    write_json(dpath, details, indent=None)
    if engine.journal is not None:
        engine.journal.close(delete=True)
    return RunResult(profile, details, out, dpath, timings)


def _check_options(opts: RunOptions) -> None:
    if opts.cost not in COST_TEXT:
        raise ProfilingError(f"--cost: {opts.cost!r} is not one of {', '.join(COST_TEXT)}")
    unknown = [s for s in opts.measure if s not in SECTIONS]
    if unknown:
        raise ProfilingError(f"--measure: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)} or none")


def _reference_pass(opts: RunOptions, arch: Architecture, runner: Runner, refs: list[BlockRef], formats: list[str],
                    inputs: torch.Tensor, targets: torch.Tensor, source: str, ntok: int
                    ) -> tuple[Engine, Collector, dict | None]:
    """The unchanged model over every window with hooks: routing statistics, input moments, proxies.

    Returns the engine (hidden states cached, journal attached), the collector and the quantized-weight cache
    the sensitivity pass may reuse (None when off)."""
    cache_bytes = 4 * sum(r.block.numel for r in refs) * len(formats)
    qcache = {} if not opts.streamed and "sensitivity" in opts.measure and cache_bytes <= QCACHE_LIMIT else None
    collector = Collector(arch, refs, formats, ntok, opts.method, qcache)
    budget = opts.state_budget_mib or (512 if opts.streamed else 128)
    engine = Engine(runner, inputs, targets, opts.batch_size, state_budget_bytes=budget << 20, progress=opts.progress)
    engine.journal = _open_journal(opts, formats, source, ntok) if opts.measure else None
    collector.embedding_moments(inputs, arch.vocab_size)
    collector.finish(runner.model, -1)
    release_freed_memory()

    def hooks(layer: int, release: bool) -> Callable[[], None]:
        handles = collector.attach(runner.model, layer)

        def done() -> None:
            for h in handles:
                h.remove()
            collector.finish(runner.model, layer)
            if release:
                release_freed_memory()  # the proxies' quantized copies of this layer's blocks
        return done

    engine.reference(lambda layer, mod: hooks(layer, True), lambda: hooks(arch.num_layers, False))
    if engine.journal is not None:
        engine.journal.check_reference(engine.ref_nll)
    return engine, collector, qcache


def _measure_effects(opts: RunOptions, arch: Architecture, engine: Engine, refs: list[BlockRef], formats: list[str],
                     mass: list, rng: np.random.Generator, qcache: dict | None, timings: dict[str, float]) -> Effects:
    """Prune cost of (sampled) single experts, top-k cost per layer, sensitivity of (sampled) single blocks."""
    from .measure import block_sensitivities, prune_costs, sample_blocks, sample_experts, topk_costs

    out = Effects()
    if "prune" in opts.measure:
        t = time.perf_counter()
        per_layer = opts.prune_per_layer
        total = sum(m.num_experts for m in arch.moe_layers)
        if per_layer is None and total > AUTO_PRUNE_ALL:
            per_layer = AUTO_PRUNE_PER_LAYER
        targets_pc = sample_experts(arch, mass, per_layer, rng)
        out.prune = prune_costs(engine, arch, targets_pc)
        out.prune_note = ("every expert" if len(targets_pc) == total else
                          f"{len(targets_pc)} of {total} experts ({per_layer} per layer, one per routing-mass rank "
                          f"stratum, seed {opts.seed}); unmeasured experts are null")
        timings["prune_cost"] = time.perf_counter() - t
    if "topk" in opts.measure:
        t = time.perf_counter()
        out.topk = topk_costs(engine, arch)
        timings["topk_cost"] = time.perf_counter() - t
    if "sensitivity" in opts.measure:
        t = time.perf_counter()
        limit = opts.measure_blocks
        if limit is None and len(refs) > AUTO_BLOCKS_ALL:
            limit = AUTO_BLOCKS_SAMPLE
        out.measured_refs = sample_blocks(refs, limit, rng)
        out.sens = block_sensitivities(engine, out.measured_refs, formats, opts.method, qcache)
        timings["sensitivity"] = time.perf_counter() - t
    return out


def _sensitivity_table(opts: RunOptions, arch: Architecture, refs: list[BlockRef], formats: list[str],
                       effects: Effects, collector: Collector) -> Table:
    """Measured cells where measured (the ``--cost`` measure, clipped at 0), the fitted proxy elsewhere."""
    group_of = {r.name: r.group for r in refs}
    meas_nll: dict[str, dict[str, float]] = {}
    meas_kl: dict[str, dict[str, float]] = {}
    for (name, f), eff in effects.sens.items():
        meas_nll.setdefault(name, {})[f] = eff.dnll
        meas_kl.setdefault(name, {})[f] = eff.kl
    for r in effects.measured_refs:  # exact formats (F32) are not run: their effect is 0
        for f in formats:
            if get_format(f).name == "F32" and get_format(f).admits(r.block.shape):
                meas_nll.setdefault(r.name, {})[f] = meas_kl.setdefault(r.name, {})[f] = 0.0
    chosen = meas_kl if opts.cost == "kl" else meas_nll
    fit = fit_proxy(collector.proxy, chosen, group_of)
    wfit = fit_proxy(collector.weight_sq, chosen, group_of)
    fitted = apply_fit(collector.proxy, fit, group_of)
    values = np.full((len(arch.blocks), len(formats)), np.nan)
    for r in refs:
        for j, f in enumerate(formats):
            if not get_format(f).admits(r.block.shape):
                continue
            m = chosen.get(r.name, {}).get(f)
            values[r.index, j] = max(0.0, m) if m is not None else (
                fitted[r.name][f] if chosen else collector.proxy[r.name][f])
    return Table(values, fit, wfit, fitted, meas_nll, meas_kl, group_of)


def _device(opts: RunOptions, formats: list[str]) -> Device:
    """Memory bandwidth and per-format throughput of this machine, or a marked placeholder."""
    if "device" not in opts.measure:
        return Device(50e9, Measurement(method="not measured (--measure without device): 50 GB/s placeholder",
                                        prior=True))
    return measure_device(formats, opts.device_repeats, opts.seed)


def _details(opts: RunOptions, arch: Architecture, out: Path, digest: str, source: str, ntok: int, window: int,
             formats: list[str], engine: Engine, timings: dict[str, float], refs: list[BlockRef], effects: Effects,
             table: Table, collector: Collector) -> dict:
    """The side file: settings, timings and the raw tables behind every profile number."""
    prune, topk = effects.prune, effects.topk
    return {
        "schema": "moecc.profile-details", "version": 1, "profile": out.name, "profile_hash": digest,
        "model": str(opts.model), "data": source, "tokens": ntok, "window": window,
        "seed": opts.seed, "streamed": opts.streamed, "quant_method": opts.method, "formats": formats,
        "cost": opts.cost,
        "reference_nll": engine.ref_nll, "timings_s": timings, "peak_rss_bytes": peak_rss_bytes(),
        "reference_layer_s": engine.layer_seconds, "reference_head_s": engine.head_seconds,
        "torch_threads": torch.get_num_threads(),
        "blocks": [r.name for r in refs], "block_index": {r.name: r.index for r in refs}, "groups": table.group_of,
        "measured_blocks": [r.name for r in effects.measured_refs],
        "proxy_raw": collector.proxy, "proxy_fitted": table.fitted, "proxy_fit": table.fit.to_json(),
        "weight_error_raw": collector.weight_sq,
        "weight_error_fitted": apply_fit(collector.weight_sq, table.wfit, table.group_of),
        "weight_error_fit": table.wfit.to_json(),
        "measured_nll": table.meas_nll, "measured_kl": table.meas_kl,
        "prune_nll": _nan_to_none(_measured_rows(arch, prune, "dnll")),
        "prune_kl": _nan_to_none(_measured_rows(arch, prune, "kl")),
        "topk_nll": [[topk[(i, k)].dnll if (i, k) in topk else 0.0 for k in range(1, m.top_k + 1)]
                     for i, m in enumerate(arch.moe_layers)],
        "topk_kl": [[topk[(i, k)].kl if (i, k) in topk else 0.0 for k in range(1, m.top_k + 1)]
                    for i, m in enumerate(arch.moe_layers)],
    }


def _open_journal(opts: RunOptions, formats: list[str], source: str, ntok: int):
    """The run's journal (``OUT.journal.jsonl``): resumed with ``--resume``, else started afresh."""
    from .journal import Journal, journal_path, model_fingerprint

    settings = {"model": model_fingerprint(opts.model), "data": source, "tokens": ntok, "window": opts.window,
                "batch_size": opts.batch_size, "seed": opts.seed, "formats": list(formats), "method": opts.method,
                "prune_per_layer": opts.prune_per_layer, "measure_blocks": opts.measure_blocks}
    return Journal(journal_path(Path(opts.output)), settings, resume=opts.resume)


def _nan_to_none(rows: list[np.ndarray]) -> list[list[float | None]]:
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in rows]


def _assemble(opts, arch, formats, source, ntok, stats, prune, prune_note, topk, values, measured_refs, refs,
              fit, device) -> Profile:
    seed = opts.seed
    stat_meas = Measurement(
        method="forward pre-hooks on every MoE layer's experts module (the router's top-k indices and weights) "
               "over the calibration windows: frequency = picks / (tokens x top_k); mean_score = mean routing weight "
               "when picked; routing_mass = summed routing weight, normalised per layer; saliency (REAP) = mean over "
               "routed tokens of routing weight x L2 norm of the expert's output"
               + (" (streamed: one decoder layer in memory at a time)" if opts.streamed else ""),
        tokens=ntok, seed=seed, source=source)
    prune_rows = None
    prune_meas = None
    if prune:
        prune_rows = tuple(np.where(np.isfinite(r), np.maximum(r, 0.0), np.nan)
                           for r in _measured_rows(arch, prune, "kl" if opts.cost == "kl" else "dnll"))
        prune_meas = Measurement(
            method=f"{COST_TEXT[opts.cost]} when the expert alone is masked out of routing "
                   "with runtime.moe.mask_experts (next-best experts routed, softmax renormalised), same calibration "
                   f"windows; measured for {prune_note}",
            tokens=ntok, seed=seed, source=source)
    experts = ExpertStats(
        frequency=tuple(s.frequency() for s in stats), mean_score=tuple(s.mean_score() for s in stats),
        routing_mass=tuple(s.routing_mass() for s in stats), saliency=tuple(s.saliency() for s in stats),
        prune_cost=prune_rows, measurement=stat_meas, prune_cost_measurement=prune_meas)
    n_meas = len(measured_refs)
    if measured_refs:
        sens_method = (
            f"measured {COST_TEXT[opts.cost]} when only this block is fake-quantized "
            f"(runtime.quant.fake_quantize, method {opts.method}) for {n_meas} of {len(refs)} quantizable blocks "
            + ("(all)" if n_meas == len(refs) else f"(seeded sample round-robin over kind/projection, seed {seed})")
            + proxy_sentence(fit, details_path(Path(opts.output)).name))
    else:
        sens_method = ("importance-matrix proxy sum_j E[x_j^2] ||W[:,j]-Q(W)[:,j]||^2, NOT scaled into nats "
                       "(no measured sensitivities: --measure without sensitivity)")
    sensitivity = Sensitivity(tuple(formats), values,
                              Measurement(method=sens_method, tokens=ntok, seed=seed, source=source))
    topk_rows = tuple(np.array([topk[(i, k)].kl if (i, k) in topk else 0.0 for k in range(1, m.top_k + 1)])
                      for i, m in enumerate(arch.moe_layers))
    topk_meas = Measurement(
        method="mean per-token KL(original || modified) in nats when only this MoE layer routes to k experts "
               "(runtime.moe.set_top_k); k = top_k is the unchanged model (0)" if topk else
        "not measured (--measure without topk): zeros", tokens=ntok if topk else None, seed=seed,
        source=source if topk else None, prior=not topk)
    return Profile(model=ModelInfo(name=Path(opts.model).resolve().name, source=str(opts.model)),
                   architecture=arch, formats=tuple(formats), experts=experts, sensitivity=sensitivity,
                   topk_cost=TopkCost(topk_rows, topk_meas), device=device)
