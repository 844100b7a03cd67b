"""The ``profile.json`` contract (schema ``moecc.profile``, version 1), loaded into frozen dataclasses.

Field-by-field documentation: ``docs/profile.md``; JSON Schema: ``optimizer/schemas/profile.schema.json``.
Per-layer arrays are aligned with ``architecture.moe_layers``; ``sensitivity.values`` has one row per block
of ``architecture.blocks`` and one column per entry of ``sensitivity.formats`` (``null`` where the format
cannot store the block or the block is not quantizable). Every measured section carries a
:class:`Measurement` saying how it was obtained. Sizes and counts are bounded by the ``MAX_*`` limits of
:mod:`optimizer.model_spec`, costs by :data:`MAX_COST_NATS` (``docs/profile.md``, "Limits").
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import InputError
from .formats import get_format
from .jsonio import (
    Reader,
    as_int,
    check_envelope,
    json_floats,
    number_array,
    number_matrix,
    read_json,
    write_json,
)
from .model_spec import (
    DEFAULT_FIXED_FORMAT,
    MAX_BLOCKS,
    MAX_DIM,
    MAX_EXPERTS,
    MAX_KV_DTYPE_BYTES,
    MAX_LAYERS,
    UNQUANTIZED_KINDS,
    Architecture,
    Block,
    BlockKind,
    KVCacheSpec,
    MoELayer,
    check_model_size,
    check_shape,
)

PROFILE_SCHEMA = "moecc.profile"
PROFILE_VERSION = 1

#: Largest loss cost in nats/token: every ``sensitivity``, ``prune_cost`` and ``topk_cost`` value, and
#: ``--expert-weight``. A uniform guess over a 150k-token vocabulary loses 12 nats; the committed profiles
#: stay below 410. Far larger costs leave the solver's tolerances meaningless next to the real ones, and at
#: 1e308 two layers' costs already sum to infinity, which no plan can record.
MAX_COST_NATS = 1e4


@dataclass(frozen=True)
class Measurement:
    """How a section's numbers were obtained. ``method`` is free text; ``prior`` marks numbers not measured."""

    method: str
    tokens: int | None = None
    seed: int | None = None
    source: str | None = None
    prior: bool = False

    def to_json(self) -> dict:
        out: dict[str, Any] = {"method": self.method}
        for key in ("tokens", "seed", "source"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.prior:
            out["prior"] = True
        return out


@dataclass(frozen=True, eq=False)
class ExpertStats:
    """Per MoE layer (aligned with ``architecture.moe_layers``), one value per routed expert.

    * ``frequency``: fraction of routing slots that chose the expert, activations / (tokens * top_k).
    * ``mean_score``: mean routing weight when selected.
    * ``routing_mass``: sum over tokens of the routing weight, normalised so that a layer sums to 1.
    * ``saliency``: REAP saliency (mean over routed tokens of gate weight x norm of expert output), optional.
    * ``prune_cost``: loss increase (nats/token) when the expert alone is removed; NaN where not measured.
    * ``prune_curve``: per layer, the measured cost of removing several experts together (:class:`PruneCurve`),
      or None for a layer not measured; optional.
    """

    frequency: tuple[np.ndarray, ...]
    mean_score: tuple[np.ndarray, ...]
    routing_mass: tuple[np.ndarray, ...]
    saliency: tuple[np.ndarray, ...] | None
    prune_cost: tuple[np.ndarray, ...] | None
    measurement: Measurement
    prune_cost_measurement: Measurement | None = None
    prune_curve: tuple[PruneCurve | None, ...] | None = None
    prune_curve_measurement: Measurement | None = None


@dataclass(frozen=True, eq=False)
class PruneCurve:
    """Cost of pruning experts of one MoE layer *together* (single-expert costs do not add up).

    ``cost[j]``: loss increase (nats/token) when the first ``counts[j]`` experts of ``order`` are removed at
    once and the layer routes to :func:`served_top_k` experts. ``order`` is a permutation of the layer's
    experts (in grouped layers every prefix of a measured length takes equally many experts from each group);
    ``counts`` ascend within ``[1, num_experts - 1]``.
    """

    order: np.ndarray
    counts: np.ndarray
    cost: np.ndarray


def served_top_k(top_k: int, experts: int, groups: int, topk_groups: int, pruned: int) -> int:
    """The top-k a layer routes to after ``pruned`` of its ``experts`` go: the original ``top_k`` if the rest can
    serve it, else all that is left (grouped routers: what the ``topk_groups`` selected groups hold)."""
    left = experts - pruned
    return min(top_k, left if groups == 1 else topk_groups * (left // groups))


@dataclass(frozen=True, eq=False)
class Sensitivity:
    """``values[b, f]``: loss increase (nats/token) when block b alone is stored in ``formats[f]``."""

    formats: tuple[str, ...]
    values: np.ndarray
    measurement: Measurement


@dataclass(frozen=True, eq=False)
class TopkCost:
    """``values[i][k-1]``: loss increase when MoE layer i alone routes to k experts (k = 1..top_k)."""

    values: tuple[np.ndarray, ...]
    measurement: Measurement


#: a device's per-token overhead above this is not a decoder's (seconds)
MAX_TOKEN_OVERHEAD_S = 60.0


@dataclass(frozen=True)
class Device:
    """Throughput of the machine the model will run on: a decoded token takes

        token_overhead_s + sum over read blocks of bytes / min(bandwidth, throughput(format))

    (``format_throughput``: dequant+matmul bytes of weights per second, where measured; ``token_overhead_s``:
    what no weight read explains, e.g. a decoder's per-op dispatch and thread sync, fitted on measured decodes).
    """

    memory_bandwidth_bytes_per_s: float
    measurement: Measurement
    format_throughput: dict[str, float] = field(default_factory=dict)  # dequant+matmul bytes of weights per s
    token_overhead_s: float = 0.0

    def tokens_per_s(self, bytes_equivalent: float) -> float:
        """Decode speed when a token reads ``bytes_equivalent`` bytes, each priced at the memory bandwidth
        (slow formats already inflated by bandwidth / throughput)."""
        return 1.0 / (self.token_overhead_s + bytes_equivalent / self.memory_bandwidth_bytes_per_s)

    def bytes_within(self, tokens_per_s: float) -> float:
        """The most bytes-equivalent a token may read to decode at ``tokens_per_s`` (negative: the overhead
        alone is too slow)."""
        return self.memory_bandwidth_bytes_per_s * (1.0 / tokens_per_s - self.token_overhead_s)


@dataclass(frozen=True)
class Prediction:
    """What a plan's objective means in measured loss, fitted on measured whole plans:

        KL(original || plan) per token ~= scale * O ** exponent

    with O the plan's ``--formulation predicted_loss`` objective (prune curves included). Single-effect costs
    do not add up, so O itself is not a loss (on R3 it over-predicts 29x); the map is monotone, so it never
    changes which plan is optimal. ``log_rmse``: root mean square of log(measured / fitted) over the ``plans``
    plans it was fitted on. Written by ``python -m profiling fit-prediction``.
    """

    scale: float
    exponent: float
    plans: int
    log_rmse: float
    measurement: Measurement

    def kl(self, objective: float) -> float:
        """The predicted KL (nats/token) of a plan whose objective is ``objective``."""
        return self.scale * max(float(objective), 0.0) ** self.exponent

    def to_json(self) -> dict:
        return {"scale": self.scale, "exponent": self.exponent, "plans": self.plans, "log_rmse": self.log_rmse,
                "measurement": self.measurement.to_json()}


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str | None = None


@dataclass(frozen=True, eq=False)
class Profile:
    model: ModelInfo
    architecture: Architecture
    formats: tuple[str, ...]
    experts: ExpertStats
    sensitivity: Sensitivity
    topk_cost: TopkCost
    device: Device
    version: int = PROFILE_VERSION
    hash: str = ""  # sha256 of the canonical JSON, filled by load/save
    prediction: Prediction | None = None  # objective -> measured KL, optional

    def to_json(self) -> dict:
        return profile_to_json(self)


def with_costs(profile: Profile, **changes: Any) -> Profile:
    """``profile`` with some of its sections replaced (costs recalibrated, curves added, formats restricted).
    The objective -> KL map was fitted to the old costs, so it is dropped; the hash is cleared unless given."""
    changes.setdefault("hash", "")
    return replace(profile, prediction=None, **changes)


# ----------------------------------------------------------------------------------------------- loading
def load_profile(path: str | os.PathLike) -> Profile:
    doc, digest = read_json(path)
    return profile_from_json(doc, digest)


def profile_from_json(doc: Any, digest: str = "") -> Profile:
    version = check_envelope(doc, PROFILE_SCHEMA, PROFILE_VERSION, "profile")
    r = Reader(doc, "profile")
    r.str("schema"), r.int("version")
    m = r.child("model")
    model = ModelInfo(name=m.str("name"), source=m.str("source", required=False))
    m.done()
    arch = _architecture_from_json(r.child("architecture"))
    formats = _formats(r.list("formats"), "profile.formats")
    experts = _experts_from_json(r.child("experts"), arch)
    sensitivity = _sensitivity_from_json(r.child("sensitivity"), arch, formats)
    topk = _topk_from_json(r.child("topk_cost"), arch)
    device = _device_from_json(r.child("device"))
    pred_r = r.child("prediction", required=False)
    prediction = _prediction_from_json(pred_r) if pred_r is not None else None
    r.done()
    return Profile(model, arch, formats, experts, sensitivity, topk, device, version, digest, prediction)


def _prediction_from_json(r: Reader) -> Prediction:
    out = Prediction(scale=r.number("scale", minimum=None), exponent=r.number("exponent", minimum=None),
                     plans=r.int("plans", minimum=2), log_rmse=r.number("log_rmse"),
                     measurement=_measurement(r.child("measurement"), f"{r.path}.measurement"))
    r.done()
    if not (out.scale > 0 and out.exponent > 0):
        raise InputError(f"{r.path}: scale and exponent must be > 0 (a map that falls as the objective grows "
                         f"predicts nothing), got {out.scale} and {out.exponent}")
    return out


def _measurement(r: Reader | None, path: str) -> Measurement:
    if r is None:
        raise InputError(f"{path}: missing required field")
    out = Measurement(
        method=r.str("method"), tokens=r.int("tokens", required=False),
        seed=r.int("seed", required=False, minimum=None),
        source=r.str("source", required=False), prior=bool(r.bool("prior", required=False)),
    )
    r.done()
    return out


def _formats(names: list, path: str) -> tuple[str, ...]:
    if not names:
        raise InputError(f"{path}: needs at least one format")
    out = []
    for i, n in enumerate(names):
        if not isinstance(n, str):
            raise InputError(f"{path}[{i}]: expected a format name, got {n!r}")
        try:
            out.append(get_format(n).name)
        except ValueError as exc:  # InputError, or int() of a 5000-digit group size
            raise InputError(f"{path}[{i}]: {exc}") from None
    if len(set(out)) != len(out):
        raise InputError(f"{path}: duplicate format names")
    return tuple(out)


def _architecture_from_json(r: Reader) -> Architecture:
    p = r.path
    family = r.str("family")
    num_layers = r.int("num_layers", minimum=1, maximum=MAX_LAYERS)
    hidden = r.int("hidden_size", minimum=1, maximum=MAX_DIM)
    vocab = r.int("vocab_size", minimum=1, maximum=MAX_DIM)
    shared = r.int("shared_experts", maximum=MAX_EXPERTS)
    groups = r.int("expert_groups", required=False, minimum=1, maximum=MAX_EXPERTS) or 1
    topk_groups = r.int("topk_groups", required=False, minimum=1, maximum=MAX_EXPERTS) or 1
    proj_raw = r.list("expert_projections", required=False)
    projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    if proj_raw is not None:
        if not proj_raw:
            raise InputError(f"{p}.expert_projections: needs at least one projection")
        for j, name in enumerate(proj_raw):
            if not isinstance(name, str):
                raise InputError(f"{p}.expert_projections[{j}]: expected a string, got {name!r}")
        if len(set(proj_raw)) != len(proj_raw):
            raise InputError(f"{p}.expert_projections: duplicate projection names")
        projections = tuple(proj_raw)
    moe_layers = []
    moe_raw = r.list("moe_layers")
    if len(moe_raw) > num_layers:
        raise InputError(f"{p}.moe_layers: {len(moe_raw)} entries for {num_layers} layers")
    for i, item in enumerate(moe_raw):
        mr = Reader(item, f"{p}.moe_layers[{i}]")
        layer = MoELayer(mr.int("layer", maximum=MAX_LAYERS), mr.int("num_experts", minimum=1, maximum=MAX_EXPERTS),
                         mr.int("top_k", minimum=1, maximum=MAX_EXPERTS))
        mr.done()
        if layer.index >= num_layers:
            raise InputError(f"{p}.moe_layers[{i}].layer: {layer.index} >= num_layers {num_layers}")
        if layer.top_k > layer.num_experts:
            raise InputError(f"{p}.moe_layers[{i}].top_k: {layer.top_k} > num_experts {layer.num_experts}")
        if layer.num_experts % groups:
            raise InputError(f"{p}.moe_layers[{i}].num_experts: {layer.num_experts} not divisible by {groups} groups")
        moe_layers.append(layer)
    if not moe_layers:
        raise InputError(f"{p}.moe_layers: a mixture-of-experts model needs at least one MoE layer")
    if len({m.index for m in moe_layers}) != len(moe_layers):
        raise InputError(f"{p}.moe_layers: duplicate layer index")
    if topk_groups > groups:
        raise InputError(f"{p}.topk_groups: {topk_groups} > expert_groups {groups}")
    for i, layer in enumerate(moe_layers):
        if layer.top_k > topk_groups * (layer.num_experts // groups):
            raise InputError(f"{p}.moe_layers[{i}].top_k: {layer.top_k} > experts in the {topk_groups} selected "
                             f"groups ({topk_groups * (layer.num_experts // groups)})")
    kv = r.child("kv_cache")
    kv_spec = KVCacheSpec(
        kind=kv.str("kind", choices=("mla", "gqa", "mha")),
        elements_per_token_per_layer=kv.int("elements_per_token_per_layer", minimum=1, maximum=MAX_DIM),
        num_layers=kv.int("num_layers", minimum=1, maximum=MAX_LAYERS),
        dtype_bytes=kv.int("dtype_bytes", required=False, minimum=1, maximum=MAX_KV_DTYPE_BYTES) or 2,
    )
    kv.done()
    blocks = _blocks_from_json(r.list("blocks"), f"{p}.blocks", {m.index: m for m in moe_layers}, projections)
    r.done()
    return Architecture(
        family=family, num_layers=num_layers, hidden_size=hidden, vocab_size=vocab, moe_layers=tuple(moe_layers),
        shared_experts=shared, blocks=blocks, kv_cache=kv_spec, expert_groups=groups, topk_groups=topk_groups,
        expert_projections=projections,
    )


def _blocks_from_json(items: list, path: str, moe: dict[int, MoELayer], projections: tuple) -> tuple[Block, ...]:
    kinds = {k.value: k for k in BlockKind}
    blocks, names = [], set()
    seen_expert_blocks: set[tuple[int, int, str]] = set()
    if len(items) > MAX_BLOCKS:
        raise InputError(f"{path}: {len(items)} blocks, more than the limit of {MAX_BLOCKS} (2**21)")
    for i, item in enumerate(items):
        br = Reader(item, f"{path}[{i}]")
        name = br.str("name")
        kind = kinds[br.str("kind", choices=tuple(kinds))]
        shape_raw = br.list("shape")
        if not shape_raw or len(shape_raw) > 3:
            raise InputError(f"{path}[{i}].shape: expected 1 to 3 dimensions, got {shape_raw!r}")
        shape = tuple(as_int(d, f"{path}[{i}].shape[{j}]", 1, MAX_DIM) for j, d in enumerate(shape_raw))
        check_shape(shape, f"{path}[{i}].shape")
        layer = br.int("layer", required=False, maximum=MAX_LAYERS)
        expert = br.int("expert", required=False, maximum=MAX_EXPERTS)
        projection = br.str("projection", required=False)
        quantizable = br.bool("quantizable", required=False)
        quantizable = (kind not in UNQUANTIZED_KINDS and len(shape) > 1) if quantizable is None else quantizable
        fixed = br.str("fixed_format", required=False)
        br.done()
        if name in names:
            raise InputError(f"{path}[{i}].name: duplicate block {name!r}")
        names.add(name)
        if not quantizable:
            fixed = fixed or DEFAULT_FIXED_FORMAT
            try:
                get_format(fixed)
            except ValueError as exc:  # InputError, or int() of a 5000-digit group size
                raise InputError(f"{path}[{i}].fixed_format: {exc}") from None
        elif fixed is not None:
            raise InputError(f"{path}[{i}].fixed_format: only non-quantizable blocks have a fixed format")
        if kind == BlockKind.ROUTED_EXPERT:
            if layer is None or expert is None or projection is None:
                raise InputError(f"{path}[{i}]: a routed_expert block needs layer, expert and projection")
            if layer not in moe:
                raise InputError(f"{path}[{i}].layer: {layer} is not an MoE layer")
            if expert >= moe[layer].num_experts:
                raise InputError(f"{path}[{i}].expert: {expert} >= num_experts {moe[layer].num_experts}")
            if projection not in projections:
                raise InputError(f"{path}[{i}].projection: {projection!r} not in {list(projections)}")
            if (layer, expert, projection) in seen_expert_blocks:
                raise InputError(f"{path}[{i}]: duplicate expert block ({layer}, {expert}, {projection})")
            seen_expert_blocks.add((layer, expert, projection))
        blocks.append(Block(name, kind, shape, layer, expert, projection, quantizable,
                            fixed if not quantizable else None))
    expected = sum(m.num_experts for m in moe.values()) * len(projections)
    if len(seen_expert_blocks) != expected:
        raise InputError(f"{path}: expected {expected} routed_expert blocks (every expert x projection), "
                         f"got {len(seen_expert_blocks)}")
    check_model_size(blocks, path)
    return tuple(blocks)


def _experts_from_json(r: Reader, arch: Architecture) -> ExpertStats:
    p, n = r.path, len(arch.moe_layers)
    sizes = [m.num_experts for m in arch.moe_layers]
    freq = number_matrix(r.list("frequency"), f"{p}.frequency", n, sizes)
    score = number_matrix(r.list("mean_score"), f"{p}.mean_score", n, sizes)
    mass = number_matrix(r.list("routing_mass"), f"{p}.routing_mass", n, sizes)
    sal_raw = r.list("saliency", required=False)
    sal = number_matrix(sal_raw, f"{p}.saliency", n, sizes) if sal_raw is not None else None
    pc_raw = r.list("prune_cost", required=False)
    pc = (number_matrix(pc_raw, f"{p}.prune_cost", n, sizes, allow_null=True, maximum=MAX_COST_NATS)
          if pc_raw is not None else None)
    meas = _measurement(r.child("measurement"), f"{p}.measurement")
    pc_meas_r = r.child("prune_cost_measurement", required=False)
    pc_meas = _measurement(pc_meas_r, f"{p}.prune_cost_measurement") if pc_meas_r is not None else None
    if pc is not None and pc_meas is None:
        raise InputError(f"{p}.prune_cost_measurement: required when prune_cost is given")
    curve_raw = r.list("prune_curve", required=False)
    curves = _prune_curves_from_json(curve_raw, f"{p}.prune_curve", arch) if curve_raw is not None else None
    curve_meas_r = r.child("prune_curve_measurement", required=False)
    curve_meas = _measurement(curve_meas_r, f"{p}.prune_curve_measurement") if curve_meas_r is not None else None
    if curves is not None and curve_meas is None:
        raise InputError(f"{p}.prune_curve_measurement: required when prune_curve is given")
    r.done()
    return ExpertStats(tuple(freq), tuple(score), tuple(mass), None if sal is None else tuple(sal),
                       None if pc is None else tuple(pc), meas, pc_meas, curves, curve_meas)


def _prune_curves_from_json(rows: list, path: str, arch: Architecture) -> tuple[PruneCurve | None, ...]:
    if len(rows) != len(arch.moe_layers):
        raise InputError(f"{path}: expected {len(arch.moe_layers)} rows (one per MoE layer, null if not measured), "
                         f"got {len(rows)}")
    return tuple(None if row is None else _prune_curve(Reader(row, f"{path}[{i}]"), m.num_experts,
                                                       arch.expert_groups)
                 for i, (row, m) in enumerate(zip(rows, arch.moe_layers)))


def _prune_curve(r: Reader, experts: int, groups: int) -> PruneCurve:
    p = r.path
    order = np.array([as_int(v, f"{p}.order[{j}]", 0, experts - 1) for j, v in enumerate(r.list("order"))], int)
    if len(order) != experts or len(set(order.tolist())) != experts:
        raise InputError(f"{p}.order: must list each of the layer's {experts} experts once")
    counts = np.array([as_int(v, f"{p}.counts[{j}]", 1, experts - 1) for j, v in enumerate(r.list("counts"))], int)
    if len(counts) == 0 or np.any(np.diff(counts) <= 0):
        raise InputError(f"{p}.counts: must be a non-empty, strictly ascending list")
    cost = number_array(r.list("cost"), f"{p}.cost", len(counts), maximum=MAX_COST_NATS)
    size = experts // groups
    for n in counts.tolist():
        per_group = np.bincount(order[:n] // size, minlength=groups)
        if np.any(per_group != per_group[0]):
            raise InputError(f"{p}: the first {n} experts of order are not spread equally over the {groups} "
                             "expert groups (a grouped router prunes the same number from each group)")
    r.done()
    return PruneCurve(order, counts, cost)


def _sensitivity_from_json(r: Reader, arch: Architecture, formats: tuple[str, ...]) -> Sensitivity:
    p = r.path
    sformats = _formats(r.list("formats"), f"{p}.formats")
    missing = [f for f in formats if f not in sformats]
    if missing:
        raise InputError(f"{p}.formats: no sensitivity for candidate format {missing[0]}")
    rows = r.list("values")
    if len(rows) != len(arch.blocks):
        raise InputError(f"{p}.values: expected one row per block ({len(arch.blocks)}), got {len(rows)}")
    values = np.full((len(rows), len(sformats)), np.nan)
    fmts = [get_format(f) for f in sformats]
    for i, (row, block) in enumerate(zip(rows, arch.blocks)):
        arr = number_array(row, f"{p}.values[{i}]", len(sformats), allow_null=True, maximum=MAX_COST_NATS)
        if block.quantizable:
            for j, fmt in enumerate(fmts):
                if fmt.admits(block.shape) and np.isnan(arr[j]) and fmt.name in formats:
                    raise InputError(f"{p}.values[{i}][{j}]: block {block.name} can be stored in {fmt.name} "
                                     "but has no value")
        values[i] = arr
    values.setflags(write=False)
    meas = _measurement(r.child("measurement"), f"{p}.measurement")
    r.done()
    return Sensitivity(sformats, values, meas)


def _topk_from_json(r: Reader, arch: Architecture) -> TopkCost:
    p = r.path
    values = number_matrix(r.list("values"), f"{p}.values", len(arch.moe_layers), [m.top_k for m in arch.moe_layers],
                           maximum=MAX_COST_NATS)
    meas = _measurement(r.child("measurement"), f"{p}.measurement")
    r.done()
    return TopkCost(tuple(values), meas)


def device_to_json(device: Device) -> dict[str, Any]:
    """A profile's ``device`` section (also the whole of a ``--device`` file; :mod:`optimizer.devices`)."""
    out: dict[str, Any] = {"memory_bandwidth_bytes_per_s": device.memory_bandwidth_bytes_per_s}
    if device.format_throughput:
        out["format_throughput"] = dict(device.format_throughput)
    if device.token_overhead_s:
        out["token_overhead_s"] = device.token_overhead_s
    out["measurement"] = device.measurement.to_json()
    return out


def device_from_json(doc: Any, path: str = "device") -> Device:
    """Inverse of :func:`device_to_json`; InputError naming ``path`` for a malformed section."""
    return _device_from_json(Reader(doc, path))


def _device_from_json(r: Reader) -> Device:
    bw = r.number("memory_bandwidth_bytes_per_s")
    if bw <= 0:
        raise InputError(f"{r.path}.memory_bandwidth_bytes_per_s: must be > 0")
    tp_raw = r.child("format_throughput", required=False)
    throughput = {}
    if tp_raw is not None:
        for key in list(tp_raw.obj):
            try:
                name = get_format(key).name
            except ValueError as exc:  # InputError, or int() of a 5000-digit group size
                raise InputError(f"{tp_raw.path}.{key}: {exc}") from None
            if name in throughput:
                raise InputError(f"{tp_raw.path}.{key}: duplicate format {name}")
            throughput[name] = tp_raw.number(key)
        tp_raw.done()
    overhead = r.number("token_overhead_s", required=False, minimum=0.0, maximum=MAX_TOKEN_OVERHEAD_S) or 0.0
    meas = _measurement(r.child("measurement"), f"{r.path}.measurement")
    r.done()
    return Device(bw, meas, throughput, overhead)


# ---------------------------------------------------------------------------------------------- writing
def profile_to_json(p: Profile) -> dict:
    a = p.architecture
    experts: dict[str, Any] = {
        "frequency": [json_floats(v) for v in p.experts.frequency],
        "mean_score": [json_floats(v) for v in p.experts.mean_score],
        "routing_mass": [json_floats(v) for v in p.experts.routing_mass],
    }
    if p.experts.saliency is not None:
        experts["saliency"] = [json_floats(v) for v in p.experts.saliency]
    if p.experts.prune_cost is not None:
        experts["prune_cost"] = [json_floats(v) for v in p.experts.prune_cost]
        experts["prune_cost_measurement"] = _written(p.experts.prune_cost_measurement, "prune_cost").to_json()
    if p.experts.prune_curve is not None:
        experts["prune_curve"] = [None if c is None else {"order": c.order.tolist(), "counts": c.counts.tolist(),
                                                          "cost": json_floats(c.cost)}
                                  for c in p.experts.prune_curve]
        experts["prune_curve_measurement"] = _written(p.experts.prune_curve_measurement, "prune_curve").to_json()
    experts["measurement"] = p.experts.measurement.to_json()
    device = device_to_json(p.device)
    return {
        "schema": PROFILE_SCHEMA,
        "version": PROFILE_VERSION,
        "model": {"name": p.model.name, **({"source": p.model.source} if p.model.source is not None else {})},
        "architecture": {
            "family": a.family, "num_layers": a.num_layers, "hidden_size": a.hidden_size, "vocab_size": a.vocab_size,
            "shared_experts": a.shared_experts, "expert_groups": a.expert_groups, "topk_groups": a.topk_groups,
            "expert_projections": list(a.expert_projections),
            "moe_layers": [{"layer": m.index, "num_experts": m.num_experts, "top_k": m.top_k} for m in a.moe_layers],
            "kv_cache": {"kind": a.kv_cache.kind,
                         "elements_per_token_per_layer": a.kv_cache.elements_per_token_per_layer,
                         "num_layers": a.kv_cache.num_layers, "dtype_bytes": a.kv_cache.dtype_bytes},
            "blocks": [b.to_json() for b in a.blocks],
        },
        "formats": list(p.formats),
        "experts": experts,
        "sensitivity": {
            "formats": list(p.sensitivity.formats),
            "values": [json_floats(row, 6) for row in p.sensitivity.values],
            "measurement": p.sensitivity.measurement.to_json(),
        },
        "topk_cost": {"values": [json_floats(v) for v in p.topk_cost.values],
                      "measurement": p.topk_cost.measurement.to_json()},
        "device": device,
        **({"prediction": p.prediction.to_json()} if p.prediction is not None else {}),
    }


def _written(m: Measurement | None, section: str) -> Measurement:
    """The measurement the contract requires beside ``section`` (a profile built without one is a bug)."""
    if m is None:
        raise ValueError(f"experts.{section} given without experts.{section}_measurement")
    return m


def save_profile(profile: Profile, path: str | os.PathLike) -> str:
    """Write ``profile`` (gzip when the path ends in ``.gz``); return its canonical hash."""
    from .jsonio import canonical_hash

    doc = profile_to_json(profile)
    write_json(path, doc, indent=None)
    return canonical_hash(doc)
