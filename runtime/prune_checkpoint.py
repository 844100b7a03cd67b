"""A plain transformers checkpoint with a plan's pruned experts removed: the input of llama.cpp's converter.

``write_pruned_checkpoint(plan, model_dir, out)`` streams the checkpoint tensor by tensor
(``safetensors.safe_open``; peak memory ~ one tensor) and writes, in the original dtypes and without any
quantization (``llama-quantize`` does that):

* the kept experts of every MoE layer, renumbered 0..N-1 in ascending original order;
* every router's weight rows and DeepSeek's ``e_score_correction_bias`` sliced to the kept experts;
* every other tensor unchanged (including tensors outside the optimizer's architecture), except those of
  decoder layers past ``num_hidden_layers``: the multi-token-prediction layers of DeepSeek-V3 and GLM-4-MoE
  checkpoints, which transformers does not build and the plan does not prune (GLM's converter would convert
  their unpruned experts against the pruned expert count and fail), are left out;
* with ``untie_embeddings``, for a tied checkpoint without ``lm_head.weight``: ``lm_head.weight`` as a copy
  of the token embedding and ``tie_word_embeddings: false`` (llama.cpp's qwen2moe and olmoe loaders require
  an ``output.weight`` and never fall back to the embedding);
* all-zero ``shared_expert_gate`` rows (Qwen2-MoE; R3's, from its zero init) set to 1e-20: llama.cpp computes
  that gate as ``silu(x) / x``, which is 0/0 = NaN for a zero row, while ``sigmoid(1e-20 h)`` is exactly the
  0.5 of a zero row in float32 (``zero_gate_names``);
* ``config.json`` with the values llama.cpp's converter reads that transformers' config of the family lacks
  (:data:`CONVERTER_CONFIG`: dots1's and GLM-4-MoE-Lite's ``scoring_func: sigmoid``; GLM-4-MoE-Lite's
  ``first_k_dense_replace``, the leading ``"dense"`` entries of its ``mlp_layer_types``;
  ``converter_config_fixes``);
* ``config.json`` with the expert count (``n_routed_experts`` / ``num_experts`` / ``num_local_experts``,
  whichever the family uses) and the top-k (``num_experts_per_tok``) of the plan, plus a ``moecc_pruned``
  provenance section; tokenizer and other side files copied.

A plain config holds one expert count and one top-k, so the plan must keep the same number N of experts
and the same k in every MoE layer (``--target llamacpp`` plans do); group-limited routers (DeepSeek's
``n_group``) need N divisible by the group count, the same count kept in every group (at least 2) and
k <= topk_group * N / n_group. Anything else is an :class:`InputError`. The directory is written through
:func:`runtime.outdir.output_dir` (as ``.NAME.moecc-partial``, renamed at the end; an existing ``NAME`` is
replaced only with ``overwrite`` and only if moecc wrote it), so a killed run never leaves a half-written
checkpoint and a user's directory is never replaced.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from optimizer.errors import InputError
from optimizer.model_spec import Architecture, Block, BlockKind
from optimizer.plan import Plan

from .checkpoint import PlannedTensor, ShardWriter, TensorInfo, copy_side_files, read_headers
from .outdir import check_output_dir, output_dir
from .plan_check import validate_layers

__all__ = ["EXPERT_COUNT_KEYS", "TOP_K_KEY", "CONVERTER_CONFIG", "LEADING_DENSE_FROM_TYPES", "leading_dense_layers",
           "converter_config_fixes", "PrunedCheckpoint",
           "uniform_layers", "plan_prunes", "write_pruned_checkpoint", "write_reference_checkpoint", "is_tied",
           "plan_digest", "zero_gate_names", "ZERO_GATE_NUDGE"]

#: config keys that hold the routed-expert count, by family (any present one is updated)
EXPERT_COUNT_KEYS = ("n_routed_experts", "num_experts", "num_local_experts")
TOP_K_KEY = "num_experts_per_tok"
#: config values llama.cpp's converter needs that transformers' config of a family lacks: dots1 routes with
#: sigmoid scores (hard-coded in transformers), but the converter writes the GGUF's expert gating function only
#: from ``scoring_func``, and without one llama.cpp aborts on the first MoE layer ("fatal error" in build_moe_ffn)
CONVERTER_CONFIG: dict[str, dict[str, str]] = {"dots1": {"scoring_func": "sigmoid"},
                                               "glm4_moe_lite": {"scoring_func": "sigmoid"}}
#: families whose transformers config names its dense layers in ``mlp_layer_types`` (absent: layer 0 only) while
#: llama.cpp's converter (deepseek2) reads their count from ``first_k_dense_replace`` (absent: none, and llama.cpp
#: then looks for experts in the dense layer 0)
LEADING_DENSE_FROM_TYPES = ("glm4_moe_lite",)
LM_HEAD = "lm_head.weight"
DEFAULT_SHARD_BYTES = 4 * 1024 ** 3
#: what an all-zero shared-expert gate row becomes (see the module docstring)
ZERO_GATE_NUDGE = 1e-20
_GATE_SUFFIX = "shared_expert_gate.weight"
_EXPERT_RE = re.compile(r"^(.*\blayers\.(\d+)\..*\.experts\.)(\d+)(\..+)$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")
_HINT = "solve with `python -m optimizer solve ... --target llamacpp`"


@dataclass(frozen=True)
class PrunedCheckpoint:
    """What :func:`write_pruned_checkpoint` wrote."""

    out: Path
    experts: int  # kept experts per MoE layer
    top_k: int
    tensors: int
    dropped: int  # tensors left out: of pruned experts, and of multi-token-prediction layers
    bytes: int  # tensor data written
    shards: int
    nudged_gates: int = 0  # all-zero shared-expert gate rows set to ZERO_GATE_NUDGE


def uniform_layers(plan: Plan, arch: Architecture) -> tuple[dict[int, list[int]], int, int]:
    """(kept original experts per MoE layer, N, k) of a plan with one expert count and one top-k.

    Raises InputError (one line) for per-layer counts or k, and for group-limited routing the kept experts
    cannot satisfy (see the module docstring); the plan must list every MoE layer.
    """
    layers = validate_layers(plan, arch)  # distinct indices, balanced groups, k reachable
    counts = sorted({len(keep) for keep, _ in layers.values()})
    ks = sorted({k for _, k in layers.values()})
    if len(counts) > 1:
        raise InputError(f"a plain checkpoint config holds one expert count, but the plan keeps {counts} experts "
                         f"in different layers; {_HINT}")
    if len(ks) > 1:
        raise InputError(f"a plain checkpoint config holds one top-k, but the plan uses {ks} in different layers; "
                         f"{_HINT}")
    n, k = counts[0], ks[0]
    groups, topk_groups = arch.expert_groups, arch.topk_groups
    if groups > 1:
        if n % groups:
            raise InputError(f"n_group={groups} must divide the kept expert count, but the plan keeps {n} per layer")
        if topk_groups > groups:
            raise InputError(f"topk_group={topk_groups} exceeds n_group={groups} in the model's config")
        if k > topk_groups * (n // groups):
            raise InputError(f"top_k={k} exceeds topk_group * experts per group = {topk_groups} * {n // groups}")
    return {layer: keep for layer, (keep, _) in layers.items()}, n, k


def plan_prunes(plan: Plan, arch: Architecture) -> bool:
    """Whether the plan removes any expert of any MoE layer."""
    sizes = {m.index: m.num_experts for m in arch.moe_layers}
    return any(len(lp.kept_experts) < sizes.get(lp.layer, len(lp.kept_experts)) for lp in plan.layers)


def _router_rows(block: Block | None, arch: Architecture) -> bool:
    """Whether a tensor has one row (or entry) per routed expert: router weight, e_score_correction_bias."""
    if block is None or block.kind != BlockKind.ROUTER or block.layer is None or "shared_expert_gate" in block.name:
        return False
    try:
        return block.shape[0] == arch.moe_layer(block.layer).num_experts
    except KeyError:
        return False


def _jobs(arch: Architecture, headers: list[TensorInfo], kept: dict[int, list[int]], untie: bool
          ) -> tuple[list[tuple[TensorInfo, str, list[int] | None]], int]:
    """(source, output name, router rows to keep or None) in file order, and the count of dropped tensors."""
    blocks = {b.name: b for b in arch.blocks}
    present = {t.name for t in headers}
    missing = [n for n in blocks if n not in present]
    if missing:
        raise InputError(f"checkpoint lacks tensor {missing[0]} of the architecture ({len(missing)} missing); "
                         f"fused-expert checkpoints are not supported")
    jobs, dropped = [], 0
    for info in headers:
        if (layer := _LAYER_RE.match(info.name)) and int(layer.group(1)) >= arch.num_layers:
            dropped += 1  # a multi-token-prediction layer (see the module docstring)
            continue
        if info.dtype.startswith("F8"):
            raise InputError(f"{info.name}: {info.dtype} checkpoint; dequantize FP8 weights to BF16 first")
        block = blocks.get(info.name)
        if block is not None and info.shape != block.shape:
            raise InputError(f"{info.name}: checkpoint shape {list(info.shape)} != config's {list(block.shape)}")
        m = _EXPERT_RE.match(info.name)
        if m and int(m.group(2)) in kept and "shared_expert" not in m.group(1):
            keep = kept[int(m.group(2))]
            expert = int(m.group(3))
            if expert not in keep:
                dropped += 1
                continue
            jobs.append((info, f"{m.group(1)}{keep.index(expert)}{m.group(4)}", None))
        elif _router_rows(block, arch):
            jobs.append((info, info.name, kept[block.layer]))
        else:
            jobs.append((info, info.name, None))
    if untie and LM_HEAD not in present:
        embedding = next(b.name for b in arch.blocks if b.kind == BlockKind.EMBEDDING)
        jobs.append((next(t for t in headers if t.name == embedding), LM_HEAD, None))
    return jobs, dropped


def _pruned_config(model_dir: Path, n: int, k: int, provenance: dict, untie: bool) -> dict:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    keys = [key for key in EXPERT_COUNT_KEYS if isinstance(config.get(key), int)]
    if not keys:
        raise InputError(f"{model_dir}/config.json: no expert count key ({', '.join(EXPERT_COUNT_KEYS)})")
    if TOP_K_KEY not in config:
        raise InputError(f"{model_dir}/config.json: no {TOP_K_KEY}")
    for key in keys:
        config[key] = n
    config[TOP_K_KEY] = k
    config.update(converter_config_fixes(config))
    if untie:
        config["tie_word_embeddings"] = False
    config["moecc_pruned"] = provenance
    return config


def write_pruned_checkpoint(plan: Plan, arch: Architecture, model_dir: str | Path, out: str | Path,
                            plan_sha256: str = "", shard_bytes: int = DEFAULT_SHARD_BYTES,
                            untie_embeddings: bool = False, overwrite: bool = False,
                            zero_gates: Sequence[str] | None = None) -> PrunedCheckpoint:
    """Write ``out``: ``model_dir`` with the plan's pruned experts removed (see the module docstring).

    ``arch`` must be ``model_dir``'s architecture (the caller checks the plan's hash against it). An
    existing ``out`` that moecc wrote is replaced, once the new checkpoint is complete, only with ``overwrite``.
    ``zero_gates``: :func:`zero_gate_names` of ``model_dir`` when the caller has them already (else read here).
    """
    kept, n, k = uniform_layers(plan, arch)
    provenance = {"version": 1, "source_architecture_hash": plan.architecture_hash, "plan_sha256": plan_sha256,
                  "kept_experts": {str(layer): keep for layer, keep in sorted(kept.items())}, "top_k": k}
    return _write_checkpoint(arch, Path(model_dir), Path(out), kept, n, k, provenance, shard_bytes, untie_embeddings,
                             overwrite, zero_gates, "runtime export --to llamacpp (pruned checkpoint)")


def write_reference_checkpoint(arch: Architecture, model_dir: str | Path, out: str | Path,
                               untie_embeddings: bool = False, overwrite: bool = False) -> PrunedCheckpoint:
    """Write ``out``: ``model_dir`` with every expert and its own top-k, made convertible as the pruned checkpoint
    is (untied head with ``untie_embeddings``, zero shared-expert gates nudged): the source of a reference GGUF.

    The checkpoint's MoE layers must share one expert count and one top-k (a plain config holds one of each).
    """
    sizes = sorted({m.num_experts for m in arch.moe_layers})
    ks = sorted({m.top_k for m in arch.moe_layers})
    if len(sizes) != 1 or len(ks) != 1:
        raise InputError(f"{model_dir}: MoE layers with {sizes} experts and top-k {ks}; a plain config holds one "
                         "of each")
    kept = {m.index: list(range(m.num_experts)) for m in arch.moe_layers}
    provenance = {"version": 1, "source_architecture_hash": arch.shape_hash(), "reference": True, "top_k": ks[0]}
    return _write_checkpoint(arch, Path(model_dir), Path(out), kept, sizes[0], ks[0], provenance,
                             DEFAULT_SHARD_BYTES, untie_embeddings, overwrite, None, "reference checkpoint")


def _write_checkpoint(arch: Architecture, model_dir: Path, out: Path, kept: dict[int, list[int]], n: int, k: int,
                      provenance: dict, shard_bytes: int, untie_embeddings: bool, overwrite: bool,
                      zero_gates: Sequence[str] | None, what: str) -> PrunedCheckpoint:
    """Stream ``model_dir`` into ``out`` keeping ``kept`` experts per MoE layer, ``n`` and ``k`` in the config."""
    check_output_dir(out, overwrite, (model_dir,))
    headers = read_headers(model_dir)
    untie = untie_embeddings and is_tied(model_dir, headers)
    jobs, dropped = _jobs(arch, headers, kept, untie)
    nudge = set(zero_gate_names(model_dir, headers) if zero_gates is None else zero_gates)
    config = _pruned_config(model_dir, n, k, {**provenance, "untied_embeddings": untie}, untie)

    planned = [PlannedTensor(name, info.dtype, (len(rows), *info.shape[1:]) if rows else info.shape)
               for info, name, rows in jobs]
    shard_of, shard, size = [], 0, 0
    for p in planned:
        if size and size + p.nbytes > shard_bytes:
            shard, size = shard + 1, 0
        shard_of.append(shard)
        size += p.nbytes
    n_shards = shard + 1 if planned else 0
    files = (["model.safetensors"] if n_shards == 1 else
             [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)])

    with output_dir(out, overwrite, (model_dir,), what) as tmp:
        _write_tensors(tmp, jobs, planned, shard_of, files, nudge)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        copy_side_files(model_dir, tmp)
    return PrunedCheckpoint(out, n, k, len(planned), dropped, sum(p.nbytes for p in planned), n_shards, len(nudge))


def _write_tensors(tmp: Path, jobs: list, planned: list[PlannedTensor], shard_of: list[int], files: list[str],
                   nudge: set[str] = frozenset()) -> None:
    """Stream every kept tensor into its shard (and the index when there are several shards)."""
    from safetensors import safe_open

    handle, handle_file = None, None
    for s in range(len(files)):
        idx = [i for i, sh in enumerate(shard_of) if sh == s]
        with ShardWriter(tmp / files[s], [planned[i] for i in idx]) as writer:
            for i in idx:
                info, name, rows = jobs[i]
                if info.file != handle_file:
                    handle, handle_file = safe_open(str(info.file), framework="pt", device="cpu"), info.file
                tensor = handle.get_tensor(info.name)
                if rows:
                    tensor = tensor.index_select(0, torch.tensor(rows, dtype=torch.long))
                if info.name in nudge:
                    tensor = torch.full_like(tensor, ZERO_GATE_NUDGE)
                writer.write(name, tensor)
                del tensor
    handle = None
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(p.nbytes for p in planned)},
                 "weight_map": {p.name: files[shard_of[i]] for i, p in enumerate(planned)}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def is_tied(model_dir: str | Path, headers: list[TensorInfo] | None = None) -> bool:
    """Whether the checkpoint ties its output head to the embedding and stores no ``lm_head.weight``."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    if not config.get("tie_word_embeddings", False):
        return False
    headers = read_headers(Path(model_dir)) if headers is None else headers
    return all(t.name != LM_HEAD for t in headers)


def zero_gate_names(model_dir: str | Path, headers: list[TensorInfo] | None = None) -> list[str]:
    """The checkpoint's ``shared_expert_gate`` weights that are all zero (llama.cpp turns them into NaN)."""
    from safetensors import safe_open

    headers = read_headers(Path(model_dir)) if headers is None else headers
    out = []
    for info in headers:
        if info.name.endswith(_GATE_SUFFIX):
            with safe_open(str(info.file), framework="pt", device="cpu") as fh:
                if not fh.get_tensor(info.name).any():
                    out.append(info.name)
    return out


def leading_dense_layers(mlp_layer_types: Sequence[str] | None) -> int:
    """How many leading layers an ``mlp_layer_types`` list makes dense (absent: 1, transformers' default)."""
    if mlp_layer_types is None:
        return 1
    return next((i for i, t in enumerate(mlp_layer_types) if t != "dense"), len(mlp_layer_types))


def converter_config_fixes(config: dict | str | Path) -> dict[str, str | int]:
    """The :data:`CONVERTER_CONFIG` entries (and, for :data:`LEADING_DENSE_FROM_TYPES`, ``first_k_dense_replace``)
    a config (a dict, or a checkpoint directory's ``config.json``) lacks or holds otherwise: what its checkpoint
    needs changed before llama.cpp's converter sees it."""
    if not isinstance(config, dict):
        config = json.loads((Path(config) / "config.json").read_text(encoding="utf-8"))
    family = config.get("model_type", "")
    wanted: dict[str, str | int] = dict(CONVERTER_CONFIG.get(family, {}))
    if family in LEADING_DENSE_FROM_TYPES:
        wanted["first_k_dense_replace"] = leading_dense_layers(config.get("mlp_layer_types"))
    return {key: value for key, value in wanted.items() if config.get(key) != value}


def plan_digest(path: str | Path) -> str:
    """SHA-256 of a plan file (recorded in the pruned checkpoint's config)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
