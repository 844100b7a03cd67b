"""Apply a plan to a transformers checkpoint, streaming: ``python -m runtime apply PLAN --model DIR -o OUT``.

Order of work (see ``docs/runtime.md``), each step its own function:

1. :func:`check_inputs`, reading no weight: the output path (:mod:`runtime.outdir`: never the model or the
   plan, an existing ``OUT`` only with ``--overwrite`` and only if moecc wrote it); the plan's
   ``architecture_hash`` against the checkpoint's ``config.json``; the plan itself (:mod:`runtime.plan_check`:
   status, every MoE layer's kept experts and top-k, fixed formats, bytes recomputed exactly); the checkpoint
   headers (every block present with its shape; no pickle, no FP8). The output layout (tensor names, dtypes,
   shapes, shards) follows from the plan alone.
2. ``method="gptq"`` only: :func:`runtime.calibration.calibrate_plan` loads the original model (float32) and
   collects the input Hessians of the int-format linear blocks on calibration text, routed as the plan says,
   layer by layer on the progressively GPTQ-quantized model; int blocks without a Hessian (embeddings) fall
   back to ``rtn``, and the manifest records each tensor's method and the calibration.
3. :func:`write_shards`: input shards are read one at a time and tensor by tensor (``safetensors.safe_open``);
   a pruned expert's tensors are skipped, router rows and DeepSeek's ``e_score_correction_bias`` are sliced
   to the kept experts, every block is quantized to its planned format and written at once (peak memory ~
   one tensor).
4. :func:`write_metadata`: ``config.json`` with a ``moecc`` section, the manifest, the index, a model card
   (``README.md``, :mod:`runtime.card`) and the source's tokenizer and generation files (never its card,
   metrics or logs).
5. The bytes written are checked against the plan: for runtime-native formats a difference above
   :data:`BYTES_TOLERANCE` raises :class:`ByteCountError` (exit 1) and ``OUT`` is not written.

Everything is written into ``.OUT.moecc-partial`` next to ``OUT`` and renamed to ``OUT`` at the end: a killed
run never leaves an ``OUT``; a rerun deletes the partial directory and writes identical weights; a failure
removes it.
"""
from __future__ import annotations

import hashlib
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from optimizer.architectures import load_architecture
from optimizer.byte_model import is_router_row_block
from optimizer.errors import InputError, MoeccError
from optimizer.formats import INT_FAMILY, get_format
from optimizer.model_spec import Architecture, Block
from optimizer.plan import Plan, load_plan

from .calibration import DEFAULT_CALIB_TOKENS, DEFAULT_DATA, calibrate_plan, parse_data
from .card import CardInputs, render_card
from .checkpoint import (
    INDEX,
    MANIFEST,
    PlannedTensor,
    ShardWriter,
    TensorInfo,
    checkpoint_fingerprint,
    copy_side_files,
    read_headers,
)
from .outdir import check_output_dir, output_dir
from .plan_check import Layers, check_plan
from .quant import CALIBRATED_METHODS, FLOAT_DTYPES, GGUF_NATIVE, METHODS, quantize, storage_format
from .quant.gptq import DEFAULT_BLOCK, DEFAULT_PERCDAMP

DEFAULT_SHARD_BYTES = 2 * 1024 ** 3
#: largest relative difference between the bytes written and the plan's for runtime-native formats
BYTES_TOLERANCE = 0.005
CARD = "README.md"


class ByteCountError(MoeccError):
    """The bytes written differ from the plan's beyond :data:`BYTES_TOLERANCE`: a bug, not bad input."""


@dataclass
class Job:
    """One block to write: where it comes from, what it becomes."""

    block: Block
    source: TensorInfo
    requested: str
    stored: str
    shape: tuple[int, ...]  # logical shape written (router rows sliced)
    rows: list[int] | None = None  # router rows to keep
    parts: list[PlannedTensor] = field(default_factory=list)
    shard: int = 0


@dataclass
class ApplyReport:
    out: Path
    weight_bytes: int
    plan_bytes: int
    file_bytes: int
    native: bool  # every planned format is stored as asked (no GGUF type mapped to an int format)
    mapped: dict[str, str]
    blocks: int
    skipped: list[str]
    shards: int
    notes: list[str] = field(default_factory=list)

    @property
    def relative_diff(self) -> float:
        return (self.weight_bytes - self.plan_bytes) / max(1, self.plan_bytes)

    def lines(self) -> list[str]:
        verdict = (f"within {BYTES_TOLERANCE:.1%} as required for runtime-native formats" if self.native else
                   "formats mapped to larger runtime formats (" +
                   ", ".join(f"{k}->{v}" for k, v in sorted(self.mapped.items())) + "); not comparable")
        out = [f"wrote {self.out} ({self.blocks} blocks in {self.shards} shard(s), {self.file_bytes:,} bytes on disk)",
               f"weights: {self.weight_bytes:,} bytes written vs {self.plan_bytes:,} predicted by the plan "
               f"({self.relative_diff:+.4%}): {verdict}"]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} checkpoint tensors outside the architecture "
                       f"(e.g. {self.skipped[0]})")
        return out + self.notes


def part_layout(name: str, stored: str, shape: tuple[int, ...]) -> list[PlannedTensor]:
    """The tensors a block of ``shape`` stored as ``stored`` becomes (:meth:`optimizer.formats.Format.parts`)."""
    return [PlannedTensor(f"{name}.{p.suffix}" if p.suffix else name, p.dtype, p.shape)
            for p in get_format(stored).parts(shape)]


def plan_jobs(plan: Plan, arch: Architecture, headers: list[TensorInfo], layers: dict[int, tuple[list[int], int]]
              ) -> tuple[list[Job], list[str]]:
    """Match plan, architecture and checkpoint headers; returns the jobs in file order and the skipped names."""
    blocks = {b.name: b for b in arch.blocks}
    per_layer = {m.index: m.num_experts for m in arch.moe_layers}
    present = {t.name: t for t in headers}
    missing = [n for n in blocks if n not in present]
    if missing:
        raise InputError(f"checkpoint lacks tensor {missing[0]} of the architecture ({len(missing)} missing)")
    for name, fmt in plan.formats.items():
        if name not in blocks:
            raise InputError(f"plan.formats.{name}: not a block of the checkpoint's architecture")
    jobs, skipped = [], []
    for info in headers:
        block = blocks.get(info.name)
        if block is None:
            skipped.append(info.name)
            continue
        if info.dtype.startswith("F8"):
            raise InputError(f"{info.name}: {info.dtype} checkpoint; dequantize FP8 weights to BF16 first")
        if info.shape != block.shape:
            raise InputError(f"{info.name}: checkpoint shape {list(info.shape)} != config's {list(block.shape)}")
        kept = set(layers[block.layer][0]) if block.is_routed_expert else None
        if kept is not None and block.expert not in kept:
            if block.name in plan.formats:
                raise InputError(f"plan.formats.{block.name}: expert {block.expert} of layer {block.layer} is pruned")
            continue
        requested = plan.formats.get(block.name)
        if requested is None:
            raise InputError(f"plan.formats: no format for {block.name}")
        rows, shape = None, block.shape
        if is_router_row_block(block, per_layer):
            rows = layers[block.layer][0]
            shape = (len(rows), *block.shape[1:])
        try:
            stored, _ = storage_format(requested, shape)
        except InputError as exc:
            raise InputError(f"plan.formats.{block.name}: {exc}") from None
        jobs.append(Job(block, info, requested, stored, shape, rows, part_layout(block.name, stored, shape)))
    return jobs, skipped


def _assign_shards(jobs: list[Job], max_bytes: int) -> int:
    shard, size = 0, 0
    for job in jobs:
        n = sum(p.nbytes for p in job.parts)
        if size and size + n > max_bytes:
            shard, size = shard + 1, 0
        job.shard, size = shard, size + n
    return shard + 1 if jobs else 0



@dataclass
class Inputs:
    """Everything :func:`check_inputs` established before any weight is read."""

    plan_path: Path
    plan_raw: bytes
    plan: Plan
    model_dir: Path
    arch: Architecture
    layers: Layers
    jobs: list[Job]
    skipped: list[str]
    files: list[str]  # output shard names, by shard index


def check_inputs(plan_path: str | Path, model_dir: str | Path, out: str | Path, overwrite: bool,
                 shard_bytes: int, extra_inputs: tuple[str | Path, ...] = ()) -> Inputs:
    """Step 1 of the module docstring; raises :class:`InputError` and reads no weight."""
    plan_path, model_dir = Path(plan_path), Path(model_dir)
    if not plan_path.is_file():
        raise InputError(f"{plan_path}: no such plan file")
    check_output_dir(out, overwrite, (model_dir, plan_path, *extra_inputs))
    plan_raw = plan_path.read_bytes()
    plan = load_plan(plan_path)
    arch = load_architecture(model_dir)
    if plan.architecture_hash != arch.shape_hash():
        raise InputError(f"plan {plan_path} was made for a different model ({plan.model_name}, {plan.family}): "
                         f"its architecture_hash {plan.architecture_hash[:19]}... != {arch.shape_hash()[:19]}... "
                         f"of {model_dir}")
    layers = check_plan(plan, arch)
    jobs, skipped = plan_jobs(plan, arch, read_headers(model_dir), layers)
    n_shards = _assign_shards(jobs, shard_bytes)
    files = [f"moecc-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    return Inputs(plan_path, plan_raw, plan, model_dir, arch, layers, jobs, skipped, files)


def write_shards(tmp: Path, inputs: Inputs, method: str, hessians, progress: Callable[[int, int, str], None] | None
                 ) -> dict[str, str]:
    """Step 3: quantize and write every job; returns int-stored block -> the method that quantized it."""
    from safetensors import safe_open

    methods: dict[str, str] = {}
    jobs, written = inputs.jobs, 0
    handles: dict[Path, object] = {}
    for shard, name in enumerate(inputs.files):
        shard_jobs = [j for j in jobs if j.shard == shard]
        with ShardWriter(tmp / name, [p for j in shard_jobs for p in j.parts]) as writer:
            for job in shard_jobs:
                if job.source.file not in handles:
                    handles.clear()  # input shards are visited in order: keep one open
                    handles[job.source.file] = safe_open(str(job.source.file), framework="pt", device="cpu")
                tensor = handles[job.source.file].get_tensor(job.source.name)
                if job.rows is not None:
                    tensor = tensor.index_select(0, torch.tensor(job.rows, dtype=torch.long))
                job_method, hessian = method, None
                if hessians is not None:
                    hessian = hessians.for_block(job.block.name)
                    job_method = method if hessian is not None else "rtn"
                qt = quantize(tensor, job.requested, job_method, hessian=hessian)
                if get_format(job.stored).family == INT_FAMILY:
                    methods[job.block.name] = job_method
                del tensor, hessian
                for part in job.parts:
                    writer.write(part.name, qt.parts[part.name[len(job.block.name):].lstrip(".")])
                del qt
                written += 1
                if progress:
                    progress(written, len(jobs), job.block.name)
    handles.clear()
    return methods


def _json_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _moecc_config(inputs: Inputs, method: str, calib) -> dict:
    """The source's ``config.json`` with the ``moecc`` section that :mod:`runtime.load` reads."""
    config = json.loads((inputs.model_dir / "config.json").read_text(encoding="utf-8"))
    config["moecc"] = {
        "version": 1,
        "method": method,
        "source_architecture_hash": inputs.plan.architecture_hash,
        "plan_sha256": hashlib.sha256(inputs.plan_raw).hexdigest(),
        "target": inputs.plan.target.value,
        "manifest": MANIFEST,
        "layers": [{"layer": layer, "kept_experts": keep, "top_k": k, "num_experts": len(keep)}
                   for layer, (keep, k) in sorted(inputs.layers.items())],
        "formats": {j.block.name: j.stored for j in inputs.jobs},
    }
    if calib is not None:
        config["moecc"]["calibration"] = calib.to_json()
    return config


def _manifest(inputs: Inputs, method: str, methods: dict[str, str], weight_bytes: int, calib) -> dict:
    manifest = {
        "schema": "moecc.runtime_manifest", "version": 1, "method": method,
        "tensors": {j.block.name: {"requested": j.requested, "stored": j.stored, "shape": list(j.shape),
                                   "source_shape": list(j.block.shape), "kind": j.block.kind.value,
                                   "file": inputs.files[j.shard], "parts": [p.name for p in j.parts],
                                   "bytes": sum(p.nbytes for p in j.parts),
                                   **({"method": methods[j.block.name]} if j.block.name in methods else {})}
                    for j in inputs.jobs},
        "bytes": {"weights": weight_bytes, "plan_total": inputs.plan.bytes.total},
        "skipped": inputs.skipped,
    }
    if calib is not None:
        manifest["calibration"] = {**calib.to_json(), "percdamp": DEFAULT_PERCDAMP, "block": DEFAULT_BLOCK}
    return manifest


def write_metadata(tmp: Path, inputs: Inputs, method: str, methods: dict[str, str], calib, command: str) -> int:
    """Step 4: config, manifest, index, card and side files; returns the weight bytes written."""
    jobs = inputs.jobs
    weight_bytes = sum(p.nbytes for j in jobs for p in j.parts)
    index = {"metadata": {"total_size": weight_bytes},
             "weight_map": {p.name: inputs.files[j.shard] for j in jobs for p in j.parts}}
    (tmp / "config.json").write_bytes(_json_bytes(_moecc_config(inputs, method, calib)))
    (tmp / MANIFEST).write_bytes(_json_bytes(_manifest(inputs, method, methods, weight_bytes, calib)))
    (tmp / INDEX).write_bytes(_json_bytes(index))
    copy_side_files(inputs.model_dir, tmp)
    card = CardInputs(source=str(inputs.model_dir), source_fingerprint=checkpoint_fingerprint(inputs.model_dir),
                      plan_path=str(inputs.plan_path), plan_sha256=hashlib.sha256(inputs.plan_raw).hexdigest(),
                      method=method, stored_formats={j.block.name: j.stored for j in jobs},
                      weight_bytes=weight_bytes, command=command)
    original = {m.index: (m.num_experts, m.top_k) for m in inputs.arch.moe_layers}
    (tmp / CARD).write_text(render_card(inputs.plan, card, original), encoding="utf-8")
    return weight_bytes


def _calibration_note(method: str, calib, methods: dict[str, str], jobs: list[Job]) -> str:
    fallback = sorted(n for n, m in methods.items() if m != method)
    gguf = sum(1 for j in jobs if j.stored in GGUF_NATIVE)
    return (f"{method}: {'sequential' if calib.sequential else 'one-pass'} Hessians from {calib.tokens:,} "
            f"tokens of {calib.source} ({calib.windows} window(s) of {calib.window}); "
            f"{len(methods) - len(fallback)} int blocks by {method}"
            + (f", {len(fallback)} without calibration input by rtn (e.g. {fallback[0]})" if fallback else "")
            + (f"; {gguf} GGUF blocks by gguf-py" if gguf else ""))


def _command_line(plan_path: Path, model_dir: Path, out: Path, method: str) -> str:
    """The command that made the output: this process's own when it is ``runtime apply``, else its equivalent."""
    argv = sys.argv[1:] if sys.argv and len(sys.argv) > 1 and sys.argv[1] == "apply" else None
    if argv is None:
        argv = ["apply", str(plan_path), "--model", str(model_dir), "-o", str(out)] + (
            ["--method", method] if method != "rtn" else [])
    return "python -m runtime " + shlex.join(argv)


def apply_plan(plan_path: str | Path, model_dir: str | Path, out: str | Path, method: str = "rtn",
               shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
               progress: Callable[[int, int, str], None] | None = None, data: str = DEFAULT_DATA,
               calib_tokens: int = DEFAULT_CALIB_TOKENS, calib_progress: bool = False,
               sequential: bool = True) -> ApplyReport:
    """Write the compressed checkpoint ``out``; see the module docstring. Raises :class:`InputError` on bad
    input (nothing written) and :class:`ByteCountError` if the bytes written disagree with the plan.

    ``data`` (``CORPUS[:SPLIT]`` or a text file), ``calib_tokens`` and ``sequential`` (layer-by-layer, else one
    pass) are the calibration of ``method="gptq"``; ``calib_progress`` shows its progress bar.
    """
    if method not in METHODS:
        raise InputError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    data_file: tuple[str | Path, ...] = ()
    if method in CALIBRATED_METHODS:
        parse_data(data)
        if calib_tokens < 1:
            raise InputError(f"--calib-tokens must be positive, got {calib_tokens}")
        data_file = (data,) if Path(data).is_file() else ()
    out = Path(out)
    inputs = check_inputs(plan_path, model_dir, out, overwrite, shard_bytes, data_file)
    hessians, calib = None, None
    if method in CALIBRATED_METHODS:
        hessians, calib = calibrate_plan(inputs.model_dir, inputs.layers,
                                         {j.block.name: j.requested for j in inputs.jobs}, data, calib_tokens,
                                         calib_progress, sequential)
    jobs = inputs.jobs
    native = all(get_format(j.requested).family == INT_FAMILY or j.requested in FLOAT_DTYPES
                 or j.requested in GGUF_NATIVE for j in jobs)
    command = _command_line(inputs.plan_path, inputs.model_dir, out, method)
    with output_dir(out, overwrite, (inputs.model_dir, inputs.plan_path, *data_file), command) as tmp:
        methods = write_shards(tmp, inputs, method, hessians, progress)
        weight_bytes = write_metadata(tmp, inputs, method, methods, calib, command)
        diff = (weight_bytes - inputs.plan.bytes.total) / max(1, inputs.plan.bytes.total)
        if native and abs(diff) > BYTES_TOLERANCE:
            raise ByteCountError(f"wrote {weight_bytes:,} weight bytes but the plan predicts "
                                 f"{inputs.plan.bytes.total:,} ({diff:+.4%}, more than {BYTES_TOLERANCE:.1%}); "
                                 f"{out} was not written. This is a bug: please report it with the plan")
        file_bytes = sum(p.stat().st_size for p in tmp.iterdir())
    mapped = {j.requested: j.stored for j in jobs if j.requested != j.stored}
    notes = [_calibration_note(method, calib, methods, jobs)] if calib is not None else []
    return ApplyReport(out, weight_bytes, inputs.plan.bytes.total, file_bytes, native, mapped, len(jobs),
                       inputs.skipped, len(inputs.files), notes)
