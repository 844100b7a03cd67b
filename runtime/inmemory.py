"""Apply a plan to a model already in memory (fake quantization): the reference for ``runtime apply``.

``compress_in_memory(model, plan)`` drops the pruned experts, sets every layer's top-k and replaces every
planned block by ``fake_quantize(block, format)``. On the same checkpoint it gives the same logits as
``runtime.load`` of ``runtime apply``'s output (tested), without writing anything.
"""
from __future__ import annotations

import torch
from torch import nn

from optimizer.architectures import architecture_from_config
from optimizer.errors import InputError
from optimizer.model_spec import Architecture
from optimizer.plan import Plan

from .layout import expert_view, in_memory_name
from .moe import drop_experts, get_layer, set_top_k
from .quant import fake_quantize


def model_architecture(model: nn.Module) -> Architecture:
    """The optimizer's architecture of a loaded transformers model (from its config)."""
    return architecture_from_config(model.config.to_dict(), type(model).__name__)


@torch.no_grad()
def compress_in_memory(model: nn.Module, plan: Plan, method: str = "rtn", check_hash: bool = True) -> nn.Module:
    """Prune, re-route and fake-quantize ``model`` in place as ``plan`` says; returns the model."""
    arch = model_architecture(model)
    if check_hash and plan.architecture_hash != arch.shape_hash():
        raise InputError(f"plan was made for a different model ({plan.model_name}); architecture hashes differ")
    if getattr(model.config, "output_router_logits", False):
        # the training-only load-balancing loss assumes the original expert count in every layer (as runtime.load)
        model.config.output_router_logits = False
    kept: dict[int, list[int]] = {}
    for lp in plan.layers:
        h = get_layer(model, lp.layer)
        if lp.top_k < h.top_k:
            set_top_k(model, lp.layer, lp.top_k)
        if len(lp.kept_experts) < h.num_experts:
            drop_experts(model, lp.layer, list(lp.kept_experts))
        set_top_k(model, lp.layer, lp.top_k)
        kept[lp.layer] = list(lp.kept_experts)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    for block in arch.blocks:
        fmt = plan.formats.get(block.name)
        if fmt is None:
            continue
        if block.is_routed_expert:
            index = kept[block.layer].index(block.expert) if block.layer in kept else block.expert
            view = expert_view(model, block.layer, index, block.projection)
            view.copy_(fake_quantize(view, fmt, method))
            continue
        name = in_memory_name(block.name)
        if name not in params:
            if name == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False):
                continue
            raise InputError(f"model has no tensor {name} named by the plan")
        t = params[name]
        t.copy_(fake_quantize(t, fmt, method))
    return model
