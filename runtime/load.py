"""Rebuild a working transformers model from a checkpoint written by ``python -m runtime apply``.

``load(OUT)`` builds the model from the original ``config.json`` (without random init), cuts every MoE
layer down to its kept experts and sets its top-k (:mod:`runtime.moe`), then dequantizes every stored block
into the model (per-expert blocks into the fused ``gate_up_proj`` / ``down_proj``). Only safetensors are
read; no remote code. The result runs on CPU in ``dtype`` (float32 by default).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from optimizer.architectures import architecture_from_config
from optimizer.errors import InputError

from .checkpoint import MANIFEST
from .layout import expert_view, fused_param, in_memory_name
from .moe import drop_experts, get_layer, set_top_k
from .quant import dequantize_parts


def is_compressed(path: str | Path) -> bool:
    """Whether ``path`` is a directory written by ``runtime apply``."""
    return (Path(path) / MANIFEST).is_file()


def read_compressed_config(path: str | Path) -> tuple[dict, dict, dict]:
    """(original config without the ``moecc`` section, the ``moecc`` section, the manifest)."""
    path = Path(path)
    if not is_compressed(path):
        raise InputError(f"{path}: not a moecc checkpoint (no {MANIFEST}); write one with `python -m runtime apply`")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read config.json / {MANIFEST}: {exc}") from None
    section = config.pop("moecc", None)
    if not isinstance(section, dict) or "layers" not in section:
        raise InputError(f"{path}/config.json: missing the 'moecc' section")
    return config, section, manifest


def _build(config: dict, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = AutoConfig.for_model(**config)
    # The auxiliary load-balancing loss is for training and assumes the original expert count in every
    # layer; a compressed model has per-layer counts, so it must not be computed at inference.
    if hasattr(cfg, "output_router_logits"):
        cfg.output_router_logits = False
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=False)
    return model


def resize_layer(model: nn.Module, layer: int, experts: int, k: int) -> None:
    """Give ``layer`` ``experts`` experts (shapes only; a balanced subset for grouped routers) and top-k ``k``."""
    h = get_layer(model, layer)
    if k < h.top_k:
        set_top_k(model, layer, k)
    if experts < h.num_experts:
        groups, size = h.num_groups, h.num_experts // h.num_groups
        per = experts // groups
        drop_experts(model, layer, [g * size + i for g in range(groups) for i in range(per)])
    set_top_k(model, layer, k)


def load(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The compressed model in ``path`` as an eval-mode transformers model on CPU."""
    from safetensors import safe_open

    path = Path(path)
    config, section, manifest = read_compressed_config(path)
    arch = architecture_from_config(config, str(path / "config.json"))
    blocks = {b.name: b for b in arch.blocks}
    model = _build(config, dtype)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()  # built without init, the head is not tied yet: it would stay zero
    kept: dict[int, list[int]] = {}
    for entry in section["layers"]:
        layer, keep, k = int(entry["layer"]), [int(e) for e in entry["kept_experts"]], int(entry["top_k"])
        resize_layer(model, layer, len(keep), k)
        kept[layer] = keep
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    filled: set[str] = set()
    handles: dict[str, object] = {}
    with torch.no_grad():
        for name, entry in manifest["tensors"].items():
            file = entry["file"]
            if file not in handles:
                handles[file] = safe_open(str(path / file), framework="pt", device="cpu")
            parts = {p[len(name):].lstrip("."): handles[file].get_tensor(p) for p in entry["parts"]}
            value = dequantize_parts(entry["stored"], entry["shape"], parts, dtype)
            block = blocks.get(name)
            if block is None:
                raise InputError(f"{path}: manifest tensor {name} is not in the model's architecture")
            if block.is_routed_expert:
                j = kept[block.layer].index(block.expert)
                expert_view(model, block.layer, j, block.projection).copy_(value)
                filled.add(f"{get_layer(model, block.layer).name}.experts.{fused_param(block.projection)}")
                continue
            target = in_memory_name(name)
            if target not in params:
                raise InputError(f"{path}: no model tensor for {name}")
            if tuple(params[target].shape) != tuple(value.shape):
                raise InputError(f"{path}: {name} has shape {list(value.shape)}, model expects "
                                 f"{list(params[target].shape)}")
            params[target].copy_(value.to(params[target].dtype))
            filled.add(target)
    handles.clear()
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False):
        tied = {"lm_head.weight"}
    persistent = {n for n, _ in model.named_parameters()}
    for mod_name, module in model.named_modules():
        for b in getattr(module, "_buffers", {}):
            if b not in getattr(module, "_non_persistent_buffers_set", set()):
                persistent.add(f"{mod_name}.{b}" if mod_name else b)
    missing = sorted(persistent - filled - tied)
    if missing:
        raise InputError(f"{path}: checkpoint does not fill {missing[0]} ({len(missing)} model tensors unfilled)")
    model.config.name_or_path = str(path)
    model.config.moecc = section
    return model.eval()
