"""The model as the optimizer sees it: MoE layers and every weight block with its exact shape.

A *block* is one stored tensor of the checkpoint in its per-expert layout (the names ``save_pretrained``
writes, e.g. ``model.layers.3.mlp.experts.17.down_proj.weight``). Routed-expert blocks carry their layer,
expert index and projection; they exist in a plan only if their expert is kept. Builders from model configs
live in :mod:`optimizer.architectures`.

The ``MAX_*`` constants bound what a profile, a plan or a model config may describe (``docs/profile.md``,
"Limits"). They lie far above any real model (DeepSeek-V3: 61 layers, 256 experts, 45,395 blocks, the
largest of 926,679,040 elements, 6.7e11 in all) and keep every byte count an exact int64 and every loop
over layers, experts or blocks bounded, so an absurd size is refused before memory is spent on it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Sequence

from .errors import InputError
from .formats import num_elements

#: Largest dimension of a block's shape (and of a config's widths: hidden size, vocabulary, ...).
MAX_DIM = 2**31
#: Most elements in one block.
MAX_BLOCK_ELEMENTS = 2**48
#: Most elements in all blocks together: 4 bytes each (F32) is 2**52 bytes, an exact int64 with room to spare.
MAX_MODEL_ELEMENTS = 2**50
#: Most decoder layers (and MoE layers) of a model.
MAX_LAYERS = 2**12
#: Most routed experts in one MoE layer (also the bound of top-k, shared experts and expert groups).
MAX_EXPERTS = 2**16
#: Most weight blocks of a model.
MAX_BLOCKS = 2**21
#: Largest KV-cache element size in bytes (float64).
MAX_KV_DTYPE_BYTES = 8


class BlockKind(str, Enum):
    """Coarse role of a weight block; plans report bytes by kind."""

    EMBEDDING = "embedding"
    ATTENTION = "attention"
    NORM = "norm"
    ROUTER = "router"
    SHARED_EXPERT = "shared_expert"
    DENSE_MLP = "dense_mlp"
    ROUTED_EXPERT = "routed_expert"
    LM_HEAD = "lm_head"


#: Kinds whose tensors stay in full precision (``fixed_format``): llama.cpp keeps norms and routers in F32.
UNQUANTIZED_KINDS = frozenset({BlockKind.NORM, BlockKind.ROUTER})
DEFAULT_FIXED_FORMAT = "F32"


def check_shape(shape: Sequence[int], where: str) -> None:
    """Refuse a shape with a dimension above :data:`MAX_DIM` or more than :data:`MAX_BLOCK_ELEMENTS` elements."""
    for j, d in enumerate(shape):
        if d > MAX_DIM:
            raise InputError(f"{where}[{j}]: {d} is larger than the limit of {MAX_DIM} (2**31) per dimension")
    if num_elements(shape) > MAX_BLOCK_ELEMENTS:
        raise InputError(f"{where}: {num_elements(shape)} elements, more than the limit of {MAX_BLOCK_ELEMENTS} "
                         f"(2**48) per block")


def check_model_size(blocks: Sequence[Block], where: str) -> None:
    """Refuse more than :data:`MAX_BLOCKS` blocks or :data:`MAX_MODEL_ELEMENTS` elements in all."""
    if len(blocks) > MAX_BLOCKS:
        raise InputError(f"{where}: {len(blocks)} blocks, more than the limit of {MAX_BLOCKS} (2**21)")
    total = sum(b.numel for b in blocks)
    if total > MAX_MODEL_ELEMENTS:
        raise InputError(f"{where}: {total} elements in all, more than the limit of {MAX_MODEL_ELEMENTS} (2**50)")


@dataclass(frozen=True)
class Block:
    """One weight tensor. ``shape`` is PyTorch's ``[out_features, in_features]`` for a linear layer."""

    name: str
    kind: BlockKind
    shape: tuple[int, ...]
    layer: int | None = None
    expert: int | None = None
    projection: str | None = None
    quantizable: bool = True
    fixed_format: str | None = None  # the format of a non-quantizable block

    @property
    def numel(self) -> int:
        return num_elements(self.shape)

    @property
    def is_routed_expert(self) -> bool:
        return self.kind == BlockKind.ROUTED_EXPERT

    def to_json(self) -> dict:
        out: dict = {"name": self.name, "kind": self.kind.value, "shape": list(self.shape)}
        for key in ("layer", "expert", "projection"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if not self.quantizable:
            out["quantizable"] = False
            out["fixed_format"] = self.fixed_format
        elif self.kind in UNQUANTIZED_KINDS or len(self.shape) < 2:  # quantizable against the default
            out["quantizable"] = True
        return out


@dataclass(frozen=True)
class MoELayer:
    """A decoder layer with routed experts: how many it has and how many the router activates."""

    index: int
    num_experts: int
    top_k: int


@dataclass(frozen=True)
class KVCacheSpec:
    """Bytes of KV cache per token and layer, in ``dtype_bytes`` per element.

    MLA (DeepSeek) caches the compressed latent plus the rope key: ``kv_lora_rank + qk_rope_head_dim``
    elements; grouped-query attention caches ``2 * num_kv_heads * head_dim``.
    """

    kind: str  # "mla" or "gqa"
    elements_per_token_per_layer: int
    num_layers: int
    dtype_bytes: int = 2

    def bytes_for(self, context_tokens: int) -> int:
        return context_tokens * self.num_layers * self.elements_per_token_per_layer * self.dtype_bytes


@dataclass(frozen=True)
class Architecture:
    """Everything about a model's shape that the byte model and the formulation need."""

    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    moe_layers: tuple[MoELayer, ...]
    shared_experts: int
    blocks: tuple[Block, ...]
    kv_cache: KVCacheSpec
    expert_groups: int = 1  # DeepSeek's n_group; 1 = no group-limited routing
    topk_groups: int = 1  # DeepSeek's topk_group
    expert_projections: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_parameters(self) -> int:
        return sum(b.numel for b in self.blocks)

    @property
    def tied_head(self) -> bool:
        """No ``lm_head`` block: the embedding matrix is the output projection too."""
        return not any(b.kind == BlockKind.LM_HEAD for b in self.blocks)

    def moe_layer(self, index: int) -> MoELayer:
        for layer in self.moe_layers:
            if layer.index == index:
                return layer
        raise KeyError(f"layer {index} is not an MoE layer")

    def blocks_of_kind(self, kinds: Iterable[BlockKind]) -> list[Block]:
        wanted = set(kinds)
        return [b for b in self.blocks if b.kind in wanted]

    def shape_hash(self) -> str:
        """Hash of every block's name and shape plus the routing layout: a plan is only valid for this."""
        payload = {
            "family": self.family,
            "moe_layers": [[m.index, m.num_experts, m.top_k] for m in self.moe_layers],
            "groups": [self.expert_groups, self.topk_groups],
            "blocks": [[b.name, list(b.shape)] for b in self.blocks],
        }
        return "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
