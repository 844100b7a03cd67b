"""Small synthetic profiles for tests and examples: random but seeded, with the same structure as real ones.

The statistics are drawn at random; a profile made here says so in every ``measurement.method``.
"""

from __future__ import annotations

import numpy as np

from .formats import get_format
from .model_spec import Architecture, Block, BlockKind, KVCacheSpec, MoELayer
from .profile import Device, ExpertStats, Measurement, ModelInfo, Profile, Sensitivity, TopkCost

DEFAULT_FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0", "BF16")


def synthetic_architecture(num_layers: int = 3, num_experts: int = 8, top_k: int = 2, hidden: int = 256,
                           expert_inter: int = 256, dense_inter: int = 512, vocab: int = 512,
                           first_dense: int = 1, groups: int = 1, topk_groups: int = 1,
                           shared: int = 1, tied: bool = False) -> Architecture:
    """A DeepSeek-like layout: ``first_dense`` dense layers, then MoE layers with routed + shared experts;
    ``tied``: no ``lm_head`` block (the embedding is the output projection)."""
    blocks: list[Block] = [Block("model.embed_tokens.weight", BlockKind.EMBEDDING, (vocab, hidden))]
    moe_layers = []
    for layer in range(num_layers):
        p = f"model.layers.{layer}"
        blocks.append(Block(f"{p}.input_layernorm.weight", BlockKind.NORM, (hidden,), layer,
                            quantizable=False, fixed_format="F32"))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            blocks.append(Block(f"{p}.self_attn.{proj}.weight", BlockKind.ATTENTION, (hidden, hidden), layer,
                                projection=proj))
        blocks.append(Block(f"{p}.post_attention_layernorm.weight", BlockKind.NORM, (hidden,), layer,
                            quantizable=False, fixed_format="F32"))
        if layer < first_dense:
            for proj, shape in (("gate_proj", (dense_inter, hidden)), ("up_proj", (dense_inter, hidden)),
                                ("down_proj", (hidden, dense_inter))):
                blocks.append(Block(f"{p}.mlp.{proj}.weight", BlockKind.DENSE_MLP, shape, layer, projection=proj))
            continue
        moe_layers.append(MoELayer(layer, num_experts, top_k))
        blocks.append(Block(f"{p}.mlp.gate.weight", BlockKind.ROUTER, (num_experts, hidden), layer,
                            quantizable=False, fixed_format="F32"))
        for e in range(num_experts):
            for proj, shape in (("gate_proj", (expert_inter, hidden)), ("up_proj", (expert_inter, hidden)),
                                ("down_proj", (hidden, expert_inter))):
                blocks.append(Block(f"{p}.mlp.experts.{e}.{proj}.weight", BlockKind.ROUTED_EXPERT, shape, layer, e,
                                    proj))
        if shared:
            si = expert_inter * shared
            for proj, shape in (("gate_proj", (si, hidden)), ("up_proj", (si, hidden)), ("down_proj", (hidden, si))):
                blocks.append(Block(f"{p}.mlp.shared_experts.{proj}.weight", BlockKind.SHARED_EXPERT, shape, layer,
                                    projection=proj))
    blocks.append(Block("model.norm.weight", BlockKind.NORM, (hidden,), quantizable=False, fixed_format="F32"))
    if not tied:
        blocks.append(Block("lm_head.weight", BlockKind.LM_HEAD, (vocab, hidden)))
    return Architecture(
        family="synthetic", num_layers=num_layers, hidden_size=hidden, vocab_size=vocab, moe_layers=tuple(moe_layers),
        shared_experts=shared, blocks=tuple(blocks), kv_cache=KVCacheSpec("gqa", 2 * hidden, num_layers),
        expert_groups=groups, topk_groups=topk_groups,
    )


def synthetic_profile(seed: int = 0, formats: tuple[str, ...] = DEFAULT_FORMATS, **arch_kwargs) -> Profile:
    """A seeded random profile over :func:`synthetic_architecture`.

    Routing statistics follow a Dirichlet draw per layer; a block's sensitivity to format f is
    ``weight * 4**(-bits_f)`` scaled by its expert's routing mass, so that bigger formats cost less.
    """
    rng = np.random.default_rng(seed)
    arch = synthetic_architecture(**arch_kwargs)
    freq, score, mass, sal, prune = [], [], [], [], []
    for m in arch.moe_layers:
        share = rng.dirichlet(np.full(m.num_experts, 0.8))
        f = share  # fraction of routing slots
        s = rng.uniform(0.2, 0.6, m.num_experts)
        ms = f * s / np.sum(f * s)
        freq.append(f), score.append(s), mass.append(ms)
        sal.append(ms * rng.uniform(0.5, 1.5, m.num_experts))
        prune.append(0.05 * ms * rng.uniform(0.8, 1.2, m.num_experts))
    mass_of = {(m.index, e): mass[i][e] for i, m in enumerate(arch.moe_layers) for e in range(m.num_experts)}
    values = np.full((len(arch.blocks), len(formats)), np.nan)
    fmts = [get_format(f) for f in formats]
    for b, block in enumerate(arch.blocks):
        if not block.quantizable:
            continue
        weight = rng.uniform(0.5, 2.0) * (mass_of[(block.layer, block.expert)] if block.is_routed_expert else 0.2)
        for j, fmt in enumerate(fmts):
            if fmt.admits(block.shape):
                values[b, j] = 0.0 if not fmt.quantized else weight * 4.0 ** (-(fmt.bits_per_weight - 1.0))
    topk = [np.array([0.02 * (m.top_k - k) ** 1.5 / m.top_k for k in range(1, m.top_k + 1)]) for m in arch.moe_layers]
    meas = Measurement(method=f"synthetic random profile (seed {seed}); not a measurement", seed=seed, prior=True)
    return Profile(
        model=ModelInfo(name=f"synthetic-{seed}"), architecture=arch,
        formats=tuple(get_format(f).name for f in formats),
        experts=ExpertStats(tuple(freq), tuple(score), tuple(mass), tuple(sal), tuple(prune), meas, meas),
        sensitivity=Sensitivity(tuple(get_format(f).name for f in formats), values, meas),
        topk_cost=TopkCost(tuple(topk), meas),
        device=Device(memory_bandwidth_bytes_per_s=50e9, measurement=meas),
    )
