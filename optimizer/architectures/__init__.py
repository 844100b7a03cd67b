"""Build an :class:`~optimizer.model_spec.Architecture` from a model's ``config.json``.

Supported: transformers configs of ``deepseek_v3``, ``deepseek_v2``, ``glm4_moe_lite`` (:mod:`.deepseek`),
``glm4_moe``, ``dots1``, ``solar_open`` (:mod:`.deepseek_gqa`), ``qwen3_moe``, ``qwen2_moe``, ``mixtral``,
``olmoe`` and ``flex_olmo`` (:mod:`.gqa_moe`), and DeepSeek's reference-inference format (``dim``,
``n_routed_experts``, ``moe_inter_dim``...). Block names are the tensor names transformers' ``save_pretrained`` writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import InputError
from ..jsonio import parse_json, read_bytes
from ..model_spec import Architecture, Block
from .deepseek import MLA_FAMILIES, deepseek_from_hf, deepseek_from_reference, is_reference_config, kv_b_gguf_rows
from .deepseek_gqa import deepseek_gqa_from_hf
from .gqa_moe import gqa_moe_from_hf

BUILDERS: dict[str, Callable[[dict, str], Architecture]] = {
    "deepseek_v3": deepseek_from_hf,
    "deepseek_v2": deepseek_from_hf,
    "glm4_moe_lite": deepseek_from_hf,
    "glm4_moe": deepseek_gqa_from_hf,
    "dots1": deepseek_gqa_from_hf,
    "solar_open": deepseek_gqa_from_hf,
    "qwen3_moe": gqa_moe_from_hf,
    "qwen2_moe": gqa_moe_from_hf,
    "mixtral": gqa_moe_from_hf,
    "olmoe": gqa_moe_from_hf,
    "flex_olmo": gqa_moe_from_hf,
}

__all__ = ["BUILDERS", "architecture_from_config", "load_architecture", "supported_model_types", "gguf_row_lengths",
           "all_gguf_row_lengths"]


def gguf_row_lengths(arch: Architecture, block: Block) -> tuple[int, ...]:
    """Row lengths of the tensors llama.cpp stores ``block`` as (a ``--target llamacpp`` format must divide each):
    the block's own row length, except DeepSeek's ``kv_b_proj``, which the converter splits
    (:func:`~optimizer.architectures.deepseek.kv_b_gguf_rows`)."""
    if arch.family in MLA_FAMILIES:
        return kv_b_gguf_rows(arch, block)
    return (block.shape[-1],)


def all_gguf_row_lengths(arch: Architecture) -> list[tuple[int, ...]]:
    """:func:`gguf_row_lengths` of every block, in block order, reading the architecture once."""
    if arch.family not in MLA_FAMILIES:
        return [(block.shape[-1],) for block in arch.blocks]
    by_layer: dict[int | None, dict[str, tuple[int, ...]]] = {}
    for b in arch.blocks:
        if len(b.shape) == 2:
            by_layer.setdefault(b.layer, {})[b.projection] = b.shape
    return [kv_b_gguf_rows(arch, b, by_layer.get(b.layer, {})) for b in arch.blocks]


def supported_model_types() -> list[str]:
    return sorted(BUILDERS)


def architecture_from_config(config: dict, where: str = "config") -> Architecture:
    """The architecture described by a config dict (transformers or DeepSeek reference format)."""
    if not isinstance(config, dict):
        raise InputError(f"{where}: config must be a JSON object, got {type(config).__name__}")
    if is_reference_config(config):
        return deepseek_from_reference(config, where)
    model_type = config.get("model_type")
    if model_type is None:
        raise InputError(f"{where}: missing key 'model_type' (and not a DeepSeek reference-format config)")
    builder = BUILDERS.get(model_type)
    if builder is None:
        raise InputError(f"{where}: unsupported model_type {model_type!r}; supported: "
                         f"{', '.join(supported_model_types())}")
    return builder(config, where)


def load_architecture(path: str | Path) -> Architecture:
    """Read ``config.json`` (a file, or a model directory containing one) and build its architecture."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise InputError(f"{path}: no such config file (expected config.json or a directory holding one)")
    config = parse_json(read_bytes(p), f"{p}: cannot read JSON config")  # bounded like the contracts
    return architecture_from_config(config, str(p))
