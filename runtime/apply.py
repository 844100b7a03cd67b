"""Apply a plan to a transformers checkpoint, streaming: ``python -m runtime apply PLAN --model DIR -o OUT``.

Order of work (see ``docs/runtime.md``):

1. Checks that read no weight: the plan's ``architecture_hash`` against the checkpoint's ``config.json``,
   the plan's layers (kept experts, top-k, balanced expert groups) and formats, the checkpoint headers
   (every block present with its shape; no pickle, no FP8).
2. The output layout (tensor names, dtypes, shapes, shards) is computed from the plan alone.
3. Input shards are read one at a time and tensor by tensor (``safetensors.safe_open``); a pruned expert's
   tensors are skipped, router rows and DeepSeek's ``e_score_correction_bias`` are sliced to the kept
   experts, every block is quantized to its planned format and written at once (peak memory ~ one tensor).
4. Everything is written into ``.OUT.moecc-partial`` next to ``OUT`` and renamed to ``OUT`` at the end: a
   killed run never leaves an ``OUT``; a rerun deletes the partial directory and writes identical files.

``method="gptq"`` first loads the whole original model (float32) and collects the input Hessians of the
int-format linear blocks on calibration text, routed as the plan says, layer by layer on the progressively
GPTQ-quantized model (:mod:`runtime.calibration`), then streams as above with those Hessians; int blocks
without a Hessian (embeddings) fall back to ``rtn``, and the manifest records each tensor's method and the
calibration.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from optimizer.architecture import Architecture, Block, BlockKind
from optimizer.architectures import load_architecture
from optimizer.errors import InputError
from optimizer.formats import INT_FAMILY, get_format
from optimizer.plan import Plan, load_plan

from .calibration import DEFAULT_CALIB_TOKENS, DEFAULT_DATA, calibrate_plan, parse_data
from .checkpoint import PlannedTensor, ShardWriter, TensorInfo, read_headers
from .moe import check_keep
from .quant import CALIBRATED_METHODS, FLOAT_DTYPES, GGUF_NATIVE, METHODS, quantize, storage_format
from .quant.gptq import DEFAULT_BLOCK, DEFAULT_PERCDAMP

MANIFEST = "moecc_manifest.json"
INDEX = "moecc.safetensors.index.json"
PARTIAL_SUFFIX = ".moecc-partial"
KILL_ENV = "MOECC_APPLY_KILL_AFTER"  # test hook: SIGKILL the process after this many blocks are written
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}


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
        ok = abs(self.relative_diff) <= 0.005
        verdict = ("within 0.5% as required for runtime-native formats" if ok else "OUTSIDE 0.5%: a bug, please report") \
            if self.native else ("formats mapped to larger runtime formats (" +
                                 ", ".join(f"{k}->{v}" for k, v in sorted(self.mapped.items())) + "); not comparable")
        out = [f"wrote {self.out} ({self.blocks} blocks in {self.shards} shard(s), {self.file_bytes:,} bytes on disk)",
               f"weights: {self.weight_bytes:,} bytes written vs {self.plan_bytes:,} predicted by the plan "
               f"({self.relative_diff:+.4%}): {verdict}"]
        if self.skipped:
            out.append(f"skipped {len(self.skipped)} checkpoint tensors outside the architecture "
                       f"(e.g. {self.skipped[0]})")
        return out + self.notes


def part_layout(name: str, stored: str, shape: tuple[int, ...]) -> list[PlannedTensor]:
    """The tensors a block of ``shape`` stored as ``stored`` becomes (see :class:`runtime.quant.QuantizedTensor`)."""
    fmt = get_format(stored)
    lead, length = shape[:-1], (shape[-1] if shape else 1)
    if fmt.name in FLOAT_DTYPES:
        return [PlannedTensor(name, fmt.name, shape)]
    if fmt.family == INT_FAMILY:
        groups = length // fmt.block_elements
        return [PlannedTensor(f"{name}.qcodes", "U8", (*lead, length * fmt.bits // 8)),
                PlannedTensor(f"{name}.qscale", "F16", (*lead, groups)),
                PlannedTensor(f"{name}.qzero", "F16", (*lead, groups))]
    row_bytes = length // fmt.block_elements * int(fmt.block_bytes)
    return [PlannedTensor(f"{name}.gguf", "U8", (*lead, row_bytes))]


def validate_layers(plan: Plan, arch: Architecture) -> dict[int, tuple[list[int], int]]:
    """Per MoE layer: (kept original expert indices, top-k); a layer absent from the plan keeps everything."""
    moe = {m.index: m for m in arch.moe_layers}
    out = {m.index: (list(range(m.num_experts)), m.top_k) for m in arch.moe_layers}
    for lp in plan.layers:
        if lp.layer not in moe:
            raise InputError(f"plan.layers: layer {lp.layer} is not an MoE layer of the checkpoint")
        keep = check_keep(moe[lp.layer].num_experts, lp.kept_experts, arch.expert_groups, arch.topk_groups,
                          lp.top_k, where=f"plan layer {lp.layer}")
        out[lp.layer] = (keep, lp.top_k)
    return out


def _is_router_row_tensor(block: Block, arch: Architecture) -> bool:
    if block.kind != BlockKind.ROUTER or block.layer is None or "shared_expert_gate" in block.name:
        return False
    try:
        return block.shape[0] == arch.moe_layer(block.layer).num_experts
    except KeyError:
        return False


def plan_jobs(plan: Plan, arch: Architecture, headers: list[TensorInfo], layers: dict[int, tuple[list[int], int]]
              ) -> tuple[list[Job], list[str]]:
    """Match plan, architecture and checkpoint headers; returns the jobs in file order and the skipped names."""
    blocks = {b.name: b for b in arch.blocks}
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
        if _is_router_row_tensor(block, arch):
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


def _json_bytes(doc: dict) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def _copy_side_files(model_dir: Path, tmp: Path) -> None:
    """Tokenizer and generation files (never weights, never the index)."""
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and p.name not in SKIP_FILES and not p.name.endswith(WEIGHT_SUFFIXES):
            shutil.copyfile(p, tmp / p.name)


def apply_plan(plan_path: str | Path, model_dir: str | Path, out: str | Path, method: str = "rtn",
               shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False,
               progress: Callable[[int, int, str], None] | None = None, data: str = DEFAULT_DATA,
               calib_tokens: int = DEFAULT_CALIB_TOKENS, calib_progress: bool = False,
               sequential: bool = True) -> ApplyReport:
    """Write the compressed checkpoint ``out``; see the module docstring. Raises InputError on bad input.

    ``data`` (``CORPUS[:SPLIT]`` or a text file), ``calib_tokens`` and ``sequential`` (layer-by-layer, else one
    pass) are the calibration of ``method="gptq"``; ``calib_progress`` shows its progress bar.
    """
    if method not in METHODS:
        raise InputError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    if method in CALIBRATED_METHODS:
        parse_data(data)
        if calib_tokens < 1:
            raise InputError(f"--calib-tokens must be positive, got {calib_tokens}")
    model_dir, out = Path(model_dir), Path(out)
    plan_raw = Path(plan_path).read_bytes() if Path(plan_path).is_file() else None
    if plan_raw is None:
        raise InputError(f"{plan_path}: no such plan file")
    plan = load_plan(plan_path)
    arch = load_architecture(model_dir)
    if plan.architecture_hash != arch.shape_hash():
        raise InputError(f"plan {plan_path} was made for a different model ({plan.model_name}, {plan.family}): "
                         f"its architecture_hash {plan.architecture_hash[:19]}... != {arch.shape_hash()[:19]}... "
                         f"of {model_dir}")
    if out.exists() and not overwrite:
        raise InputError(f"-o: {out} exists; remove it or pass --overwrite")
    if out.resolve() == model_dir.resolve():
        raise InputError("-o: the output must differ from --model")
    layers = validate_layers(plan, arch)
    jobs, skipped = plan_jobs(plan, arch, read_headers(model_dir), layers)
    n_shards = _assign_shards(jobs, shard_bytes)
    files = [f"moecc-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    hessians, calib = None, None
    if method in CALIBRATED_METHODS:
        hessians, calib = calibrate_plan(model_dir, layers, {j.block.name: j.requested for j in jobs}, data,
                                         calib_tokens, calib_progress, sequential)
    methods: dict[str, str] = {}  # int-stored block -> the method that quantized it

    tmp = out.parent / f".{out.name}{PARTIAL_SUFFIX}"
    if tmp.exists():
        shutil.rmtree(tmp)  # a killed earlier run: restart cleanly
    tmp.mkdir(parents=True)
    kill_after = int(os.environ.get(KILL_ENV, "0") or 0)
    written = 0
    from safetensors import safe_open

    handles: dict[Path, object] = {}
    for shard in range(n_shards):
        shard_jobs = [j for j in jobs if j.shard == shard]
        with ShardWriter(tmp / files[shard], [p for j in shard_jobs for p in j.parts]) as writer:
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
                    suffix = part.name[len(job.block.name):].lstrip(".")
                    writer.write(part.name, qt.parts[suffix])
                del qt
                written += 1
                if progress:
                    progress(written, len(jobs), job.block.name)
                if kill_after and written >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
    handles.clear()

    weight_bytes = sum(p.nbytes for j in jobs for p in j.parts)
    mapped = {j.requested: j.stored for j in jobs if j.requested != j.stored}
    native = all(get_format(j.requested).family == INT_FAMILY or j.requested in FLOAT_DTYPES
                 or j.requested in GGUF_NATIVE for j in jobs)
    notes = []
    if calib is not None:
        fallback = sorted(n for n, m in methods.items() if m != method)
        gguf = sum(1 for j in jobs if j.stored in GGUF_NATIVE)
        notes.append(f"{method}: {'sequential' if calib.sequential else 'one-pass'} Hessians from {calib.tokens:,} "
                     f"tokens of {calib.source} "
                     f"({calib.windows} window(s) of {calib.window}); {len(methods) - len(fallback)} int blocks by "
                     f"{method}" + (f", {len(fallback)} without calibration input by rtn (e.g. {fallback[0]})"
                                    if fallback else "")
                     + (f"; {gguf} GGUF blocks by gguf-py" if gguf else ""))
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    config["moecc"] = {
        "version": 1,
        "method": method,
        "source_architecture_hash": plan.architecture_hash,
        "plan_sha256": hashlib.sha256(plan_raw).hexdigest(),
        "target": plan.target.value,
        "manifest": MANIFEST,
        "layers": [{"layer": l, "kept_experts": keep, "top_k": k, "num_experts": len(keep)}
                   for l, (keep, k) in sorted(layers.items())],
        "formats": {j.block.name: j.stored for j in jobs},
    }
    if calib is not None:
        config["moecc"]["calibration"] = calib.to_json()
    manifest = {
        "schema": "moecc.runtime_manifest", "version": 1, "method": method,
        "tensors": {j.block.name: {"requested": j.requested, "stored": j.stored, "shape": list(j.shape),
                                   "source_shape": list(j.block.shape), "kind": j.block.kind.value,
                                   "file": files[j.shard], "parts": [p.name for p in j.parts],
                                   "bytes": sum(p.nbytes for p in j.parts),
                                   **({"method": methods[j.block.name]} if j.block.name in methods else {})}
                    for j in jobs},
        "bytes": {"weights": weight_bytes, "plan_total": plan.bytes.total},
        "skipped": skipped,
    }
    if calib is not None:
        manifest["calibration"] = {**calib.to_json(), "percdamp": DEFAULT_PERCDAMP, "block": DEFAULT_BLOCK}
    index = {"metadata": {"total_size": weight_bytes},
             "weight_map": {p.name: files[j.shard] for j in jobs for p in j.parts}}
    (tmp / "config.json").write_bytes(_json_bytes(config))
    (tmp / MANIFEST).write_bytes(_json_bytes(manifest))
    (tmp / INDEX).write_bytes(_json_bytes(index))
    _copy_side_files(model_dir, tmp)
    file_bytes = sum(p.stat().st_size for p in tmp.iterdir())
    if out.exists():
        trash = out.parent / f".{out.name}.moecc-old"
        if trash.exists():
            shutil.rmtree(trash)
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash)
    else:
        tmp.rename(out)
    return ApplyReport(out, weight_bytes, plan.bytes.total, file_bytes, native, mapped, len(jobs), skipped, n_shards,
                       notes)
