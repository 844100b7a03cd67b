"""Family-agnostic access to the MoE layers of a loaded transformers (5.x) model.

transformers keeps the routed experts of a layer fused in memory: ``experts.gate_up_proj`` ``[E, 2I, H]``
(gate = first I rows, up = last I rows) and ``experts.down_proj`` ``[E, H, I]``; the router is the block's
``gate`` (``.weight`` ``[E, H]``, ``.top_k``, ``.num_experts``; DeepSeek-V3's router, which GLM-4-MoE,
GLM-4-MoE-Lite, dots1 and Solar Open copy line for line, adds the buffer ``e_score_correction_bias`` ``[E]`` and
group-limited routing over ``num_group`` equal groups). Expert counts and top-k are attributes of each module, so
they may differ per layer; this module edits them in place. Routers are told apart by those attributes, not by family:
DeepSeek-V2's has ``topk_method``, the DeepSeek-V3 kind ``e_score_correction_bias``, the rest (Qwen2/3-MoE,
Mixtral, OLMoE, FlexOlmo) are softmax top-k routers.

* :func:`moe_layers` / :func:`get_layer`: the MoE layers (index, block, router, experts, shared experts).
* :func:`set_top_k`: change how many experts a layer's router activates.
* :func:`drop_experts`: keep only some experts of a layer (router rows, score bias, fused tensors sliced).
* :func:`mask_experts`: a context manager that removes experts from routing without touching weights; the
  next-best experts are routed instead, exactly as after :func:`drop_experts`.
"""
from __future__ import annotations

import re
import types
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from optimizer.errors import InputError

__all__ = ["MoELayerHandle", "moe_layers", "get_layer", "num_experts", "top_k", "set_top_k",
           "drop_experts", "mask_experts", "check_keep"]

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class MoELayerHandle:
    """One MoE layer of a loaded model: its decoder-layer ``index`` and the modules that make it up."""

    index: int
    name: str  # module path of the sparse-MoE block, e.g. "model.layers.3.mlp"
    block: nn.Module
    router: nn.Module
    experts: nn.Module
    shared: nn.Module | None = None  # DeepSeek's shared_experts / Qwen2-MoE's shared_expert
    shared_gate: nn.Module | None = None  # Qwen2-MoE's shared_expert_gate

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])

    @property
    def top_k(self) -> int:
        return int(self.router.top_k)

    @property
    def num_groups(self) -> int:
        """Expert groups of group-limited routing (DeepSeek's ``n_group``); 1 without."""
        return int(getattr(self.router, "num_group", 1) or 1)

    @property
    def topk_groups(self) -> int:
        return int(getattr(self.router, "topk_group", 1) or 1)


def _is_moe_block(module: nn.Module) -> bool:
    gate, experts = getattr(module, "gate", None), getattr(module, "experts", None)
    return (isinstance(gate, nn.Module) and isinstance(getattr(gate, "weight", None), torch.Tensor)
            and hasattr(gate, "top_k") and isinstance(experts, nn.Module)
            and isinstance(getattr(experts, "down_proj", None), torch.Tensor))


def moe_layers(model: nn.Module) -> list[MoELayerHandle]:
    """Every sparse-MoE block of ``model`` in layer order (fused-expert transformers 5.x layout)."""
    out = []
    for name, module in model.named_modules():
        if not _is_moe_block(module):
            continue
        m = _LAYER_RE.search(name + ".")
        if m is None:
            raise InputError(f"MoE block {name!r} is not inside a 'layers.<i>' module list")
        shared = getattr(module, "shared_experts", None) or getattr(module, "shared_expert", None)
        out.append(MoELayerHandle(int(m.group(1)), name, module, module.gate, module.experts, shared,
                                  getattr(module, "shared_expert_gate", None)))
    if not out:
        raise InputError(f"{type(model).__name__}: no MoE layers with fused experts found (transformers >= 5 layout)")
    return sorted(out, key=lambda h: h.index)


def get_layer(model: nn.Module, layer: int) -> MoELayerHandle:
    """The MoE layer with decoder-layer index ``layer``."""
    for handle in moe_layers(model):
        if handle.index == layer:
            return handle
    raise InputError(f"layer {layer} is not an MoE layer of {type(model).__name__}")


def num_experts(model: nn.Module, layer: int) -> int:
    """Routed experts currently present in ``layer``."""
    return get_layer(model, layer).num_experts


def top_k(model: nn.Module, layer: int) -> int:
    """Experts ``layer``'s router currently activates per token."""
    return get_layer(model, layer).top_k


def _max_top_k(h: MoELayerHandle, experts: int) -> int:
    """Largest k the router can route with ``experts`` experts (group-limited routing caps it)."""
    if h.num_groups > 1:
        return h.topk_groups * (experts // h.num_groups)
    return experts


def set_top_k(model: nn.Module, layer: int, k: int) -> None:
    """Make ``layer``'s router activate ``k`` experts per token (1 <= k <= routable experts)."""
    h = get_layer(model, layer)
    limit = _max_top_k(h, h.num_experts)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > limit:
        raise InputError(f"layer {layer}: top_k must be an integer in 1..{limit} ({h.num_experts} experts), got {k!r}")
    h.router.top_k = k
    if hasattr(h.block, "top_k"):  # Mixtral keeps a copy on the block
        h.block.top_k = k


def check_keep(num: int, keep: Sequence[int], groups: int = 1, topk_groups: int = 1, k: int | None = None,
               where: str = "layer") -> list[int]:
    """Validate a kept-expert list against ``num`` experts and ``groups`` equal routing groups; returns it sorted.

    Group-limited routers (DeepSeek-V3) view scores as ``[groups, E / groups]`` and sum each group's top-2,
    so every group must keep the same number of experts, at least 2.
    """
    keep = [int(e) for e in keep]
    if not keep:
        raise InputError(f"{where}: must keep at least one expert")
    if len(set(keep)) != len(keep) or any(e < 0 or e >= num for e in keep):
        raise InputError(f"{where}: kept experts must be distinct indices in 0..{num - 1}, got {keep}")
    keep = sorted(keep)
    if groups > 1:
        size = num // groups
        counts = [sum(1 for e in keep if e // size == g) for g in range(groups)]
        if len(set(counts)) != 1:
            raise InputError(f"{where}: group-limited routing needs the same number of kept experts in each of "
                             f"the {groups} groups, got {counts} (keep a multiple of {groups}, balanced)")
        if counts[0] < 2:
            raise InputError(f"{where}: group-limited routing needs at least 2 kept experts per group, got {counts[0]}")
    if k is not None:
        limit = topk_groups * (len(keep) // groups) if groups > 1 else len(keep)
        if k > limit:
            raise InputError(f"{where}: top_k={k} exceeds the {limit} experts the router can reach with "
                             f"{len(keep)} kept experts")
    return keep


def _slice_first_dim(module: nn.Module, num: int, index: torch.Tensor) -> None:
    """Slice every direct parameter and buffer of ``module`` whose first dimension has ``num`` entries."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.dim() >= 1 and param.shape[0] == num:
            setattr(module, name, nn.Parameter(param.data.index_select(0, index.to(param.device)).contiguous(),
                                               requires_grad=param.requires_grad))
    for name, buf in list(module.named_buffers(recurse=False)):
        if buf is not None and buf.dim() >= 1 and buf.shape[0] == num:
            setattr(module, name, buf.index_select(0, index.to(buf.device)).contiguous())


def drop_experts(model: nn.Module, layer: int, keep: Sequence[int]) -> None:
    """Keep only experts ``keep`` (current indices) of ``layer``; the rest are deleted.

    Slices the router's weight rows and DeepSeek's ``e_score_correction_bias``, the fused expert tensors
    (and any per-expert parameter), and updates ``num_experts``. Surviving experts are renumbered
    0..len(keep)-1 in ascending original order. Refuses group-unbalanced keeps for grouped routers and keeps
    that leave fewer experts than the layer's top-k.
    """
    h = get_layer(model, layer)
    n = h.num_experts
    keep = check_keep(n, keep, h.num_groups, h.topk_groups, h.top_k, where=f"layer {layer}")
    index = torch.tensor(keep, dtype=torch.long)
    _slice_first_dim(h.router, n, index)
    _slice_first_dim(h.experts, n, index)
    for module in (h.router, h.experts, h.block):
        if hasattr(module, "num_experts"):
            module.num_experts = len(keep)


# --------------------------------------------------------------------------- masking


def _masked_softmax_forward(router: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor):
    """Softmax top-k routing (Qwen2/3-MoE, OLMoE, FlexOlmo, Mixtral) with ``mask``ed experts' logits at -inf."""
    hidden_states = hidden_states.reshape(-1, router.hidden_dim)
    router_logits = F.linear(hidden_states, router.weight)
    masked = router_logits.masked_fill(mask.to(router_logits.device), float("-inf"))
    probs = F.softmax(masked.float(), dim=-1)
    top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
    if hasattr(router, "norm_topk_prob"):
        top_value = top_value.to(router_logits.dtype)
    return router_logits, top_value, top_index


def _masked_grouped_forward(router: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor):
    """DeepSeek-V3 (and GLM-4-MoE(-Lite), dots1, Solar Open) sigmoid, group-limited routing with ``mask``ed
    experts never chosen.

    A group's score is the sum of its two best unmasked experts (its only one, if one is left; -inf if none),
    which equals the dropped model's group score whenever every group keeps >= 2 experts.
    """
    hidden_states = hidden_states.view(-1, router.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), router.weight.type(torch.float32))
    scores = router_logits.sigmoid()
    choice = (scores + router.e_score_correction_bias).masked_fill(mask.to(scores.device), float("-inf"))
    groups = int(router.num_group)
    per_group = choice.view(-1, groups, router.num_experts // groups)
    best = per_group.topk(min(2, per_group.shape[-1]), dim=-1)[0]
    group_scores = torch.where(torch.isinf(best), torch.zeros_like(best), best).sum(dim=-1)
    group_scores = group_scores.masked_fill(torch.isinf(best).all(dim=-1), float("-inf"))
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand_as(per_group).reshape(-1, router.num_experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    top_index = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    top_weight = scores.gather(1, top_index)
    if router.norm_topk_prob:
        top_weight = top_weight / (top_weight.sum(dim=-1, keepdim=True) + 1e-20)
    return router_logits, top_weight * router.routed_scaling_factor, top_index


def _masked_v2_forward(router: nn.Module, hidden_states: torch.Tensor, mask: torch.Tensor):
    """DeepSeek-V2 routing with ``mask``ed experts never chosen: softmax over the unmasked experts (as over the
    experts a dropped model keeps), group-limited greedy on each group's best unmasked score, the top-k scores
    *not* renormalised, times ``routed_scaling_factor`` -- the router's own forward on the masked logits."""
    hidden_states = hidden_states.view(-1, router.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), router.weight.type(torch.float32))
    masked = router_logits.masked_fill(mask.to(router_logits.device), float("-inf"))
    scores = masked.softmax(dim=-1, dtype=torch.float32)
    if router.topk_method == "group_limited_greedy":
        groups = int(router.num_group)
        group_scores = scores.view(-1, groups, router.num_experts // groups).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, groups, router.num_experts // groups)
        scores = scores.masked_fill(~score_mask.reshape(-1, router.num_experts).bool(), 0.0)
    top_weight, top_index = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    return router_logits, top_weight * router.routed_scaling_factor, top_index


def _masked_forward(router: nn.Module, mask: torch.Tensor):
    if hasattr(router, "topk_method"):  # DeepSeek-V2
        fn = _masked_v2_forward
    elif hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3, GLM-4-MoE(-Lite), dots1, Solar Open
        fn = _masked_grouped_forward
    else:
        fn = _masked_softmax_forward

    def forward(self: nn.Module, hidden_states: torch.Tensor):
        return fn(self, hidden_states, mask)

    return types.MethodType(forward, router)


@contextmanager
def mask_experts(model: nn.Module, masked: Mapping[int, Sequence[int]]) -> Iterator[None]:
    """Within the ``with`` block, never route to ``masked[layer]`` experts (current indices); weights untouched.

    The masked experts' router logits (softmax routers) or selection scores (DeepSeek) are forced to -inf
    before top-k, so the next-best experts are routed instead and, for softmax routers, the probabilities
    are renormalised over the unmasked experts: the forward pass equals that of :func:`drop_experts` with the
    complement kept. Nested masks are not combined: the innermost mask of a layer wins. In grouped routers
    (DeepSeek) a mask is refused unless any ``topk_groups`` groups the router may pick (those with an unmasked
    expert) hold ``top_k`` unmasked experts: balanced masks, as plans have, pass.
    """
    patched: list[tuple[nn.Module, object]] = []
    try:
        for layer, experts in masked.items():
            h = get_layer(model, int(layer))
            n = h.num_experts
            bad = [e for e in experts if not 0 <= int(e) < n]
            if bad:
                raise InputError(f"layer {layer}: cannot mask experts {bad}; the layer has {n}")
            mask = torch.zeros(n, dtype=torch.bool)
            mask[[int(e) for e in experts]] = True
            left = n - int(mask.sum())
            if h.num_groups > 1:
                size = n // h.num_groups
                # the router picks groups by score, not by how many unmasked experts they hold: whichever
                # topk_groups groups with an unmasked expert it picks must still hold top_k of them
                reach = sorted(r for g in range(h.num_groups) if (r := int((~mask[g * size:(g + 1) * size]).sum())))
                left = sum(reach[:h.topk_groups])
            if h.top_k > left:
                raise InputError(f"layer {layer}: masking {len(experts)} experts leaves {left} routable, "
                                 f"fewer than top_k={h.top_k}")
            patched.append((h.router, h.router.__dict__.get("forward")))
            h.router.forward = _masked_forward(h.router, mask)
        yield
    finally:
        for router, previous in reversed(patched):
            if previous is None:
                del router.forward
            else:
                router.forward = previous
