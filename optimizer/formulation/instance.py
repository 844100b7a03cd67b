"""From (profile, budget, options) to the arrays that both the MILP and the decomposition read.

Experts of all MoE layers are numbered globally (layer by layer). Every quantizable block gets one
*candidate pair* per format that can store it; ``pair_*`` arrays are sorted by block, so the pairs of block
b are ``pair_ptr[b]:pair_ptr[b+1]``. Dominated formats are removed here (``presolve``): a format that is no
smaller, no faster to read and no less damaging than another one for a block (for every expert of a
(layer, projection) under ``--target llamacpp``) can never be needed by an optimal plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..architectures import all_gguf_row_lengths
from ..budget import Budget
from ..byte_model import block_bytes, bytes_table
from ..errors import InputError
from ..formats import get_format
from ..model_spec import Architecture, BlockKind
from ..plan import Target
from ..profile import Profile
from .objectives import ObjectiveOptions, ObjectiveTerms, build_objective


@dataclass(frozen=True)
class FormulationOptions:
    """Everything besides the profile and the budget that shapes the optimisation problem."""

    objective: str = "importance"
    objective_options: ObjectiveOptions = field(default_factory=ObjectiveOptions)
    target: Target = Target.HF
    formats: tuple[str, ...] | None = None  # candidate formats; None = the profile's
    min_experts: float = 0.0  # per layer: a count (>= 1) or a fraction of the layer's experts (< 1)
    min_top_k: int = 1
    min_tokens_per_s: float | None = None
    presolve: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.target, Target):
            try:
                object.__setattr__(self, "target", Target(self.target))
            except ValueError:
                raise InputError(f"--target: {self.target!r} is not one of hf, llamacpp") from None


@dataclass(frozen=True, eq=False)
class Instance:
    profile: Profile
    options: FormulationOptions
    budget: Budget
    objective: ObjectiveTerms
    formats: tuple[str, ...]
    # MoE layers (index i over architecture.moe_layers)
    layer_experts: np.ndarray  # E_i
    layer_top_k: np.ndarray  # K_i
    layer_min_experts: np.ndarray
    layer_first_expert: np.ndarray  # global id of expert 0 of layer i
    topk_cost: tuple[np.ndarray, ...]  # cost of k = 1..K_i
    min_top_k: int
    groups: int
    topk_groups: int
    # experts (global id g)
    expert_layer: np.ndarray
    expert_local: np.ndarray
    expert_group: np.ndarray
    drop_cost: np.ndarray
    router_bytes: np.ndarray  # router rows (and bias entries) that exist only while the expert is kept
    # blocks and candidate pairs
    block_owner: np.ndarray  # global expert id, or -1 for blocks every plan keeps
    block_quantizable: np.ndarray
    pair_block: np.ndarray
    pair_format: np.ndarray  # index into ``formats``
    pair_bytes: np.ndarray
    pair_read: np.ndarray  # bytes-equivalent read per decoded token (see constraints (5))
    pair_cost: np.ndarray
    pair_ptr: np.ndarray
    fixed_bytes: int  # non-quantizable blocks that every plan keeps
    fixed_read: int
    removed_pairs: int  # dominated pairs dropped by presolve

    @property
    def available(self) -> int:
        return self.budget.available

    @property
    def capacity(self) -> int:
        """Bytes left for the decisions: the budget's available bytes less the blocks every plan keeps."""
        return self.budget.available - self.fixed_bytes

    @property
    def fixed_read_per_token(self) -> int:
        """Bytes every plan reads per decoded token: the fixed blocks and the KV cache at its reserve."""
        return int(self.fixed_read + self.budget.reserves.get("kv_cache", 0))

    @property
    def read_limit(self) -> float:
        """Bytes the decisions may read per token under ``--min-tokens-per-s``: bandwidth x (1 / tokens per
        second - the device's per-token overhead), floored, less :attr:`fixed_read_per_token` (the right side of
        the speed row (5))."""
        if self.options.min_tokens_per_s is None:
            raise InputError("no --min-tokens-per-s: there is no read limit")
        within = self.profile.device.bytes_within(self.options.min_tokens_per_s)
        return float(math.floor(within) - self.fixed_read_per_token)

    def tokens_per_s(self, read: float) -> float:
        """Decode speed when the decisions read ``read`` bytes per token (the speed row's device model)."""
        return self.profile.device.tokens_per_s(read + self.fixed_read_per_token)

    @property
    def prune_count_cost(self) -> tuple[np.ndarray, ...] | None:
        """g_i(n) for n = 0..E_i experts pruned in MoE layer i (:mod:`.objectives`); None without prune curves."""
        return self.objective.prune_count

    @property
    def num_experts(self) -> int:
        return int(self.expert_layer.shape[0])

    def pairs_of(self, block: int) -> slice:
        return slice(int(self.pair_ptr[block]), int(self.pair_ptr[block + 1]))


def build_instance(profile: Profile, budget: Budget, options: FormulationOptions) -> Instance:
    """Validate the options against the profile (cheap checks first), then build the arrays."""
    arch = profile.architecture
    formats = _candidate_formats(profile, options)
    moe = arch.moe_layers
    E = np.array([m.num_experts for m in moe])
    K = np.array([m.top_k for m in moe])
    if options.min_top_k < 1 or options.min_top_k > K.min():
        raise InputError(f"--min-top-k: must lie in [1, {int(K.min())}] (the smallest original top-k), "
                         f"got {options.min_top_k}")
    min_exp = _min_experts(options.min_experts, E, options.min_top_k)
    G, TG = arch.expert_groups, arch.topk_groups
    per_group = E // G
    unroutable = np.flatnonzero(K > TG * per_group)
    if len(unroutable):
        i = int(unroutable[0])
        raise InputError(f"architecture: layer {moe[i].index} has top_k {int(K[i])} but its topk_groups={TG} selected "
                         f"groups hold only {TG * int(per_group[i])} experts")
    if options.target == Target.LLAMACPP:
        m_lo = max(int(np.ceil(min_exp / G).max()), 2 if G > 1 else 0, math.ceil(options.min_top_k / TG))
        if m_lo > int(per_group.min()):
            raise InputError(f"--min-experts: llama.cpp needs the same expert count in every layer, but "
                             f"{m_lo * G} experts do not fit the smallest layer ({int(E.min())} experts)")
    if options.target == Target.LLAMACPP and len(set(K.tolist())) > 1:
        raise InputError("--target llamacpp: the model's MoE layers have different top-k; llama.cpp knows one")
    if options.min_tokens_per_s is not None and not (options.min_tokens_per_s > 0
                                                     and math.isfinite(options.min_tokens_per_s)):
        raise InputError("--min-tokens-per-s: must be a positive number")
    objective = build_objective(profile, options.objective, options.objective_options)

    first = np.concatenate([[0], np.cumsum(E)[:-1]])
    expert_layer = np.repeat(np.arange(len(moe)), E)
    expert_local = np.concatenate([np.arange(n) for n in E])
    expert_group = expert_local // (np.repeat(E, E) // G)
    drop = np.concatenate([np.asarray(d, float) for d in objective.drop])
    gid = {(m.index, e): int(first[i] + e) for i, m in enumerate(moe) for e in range(m.num_experts)}
    layer_pos = {m.index: i for i, m in enumerate(moe)}

    n_blocks = len(arch.blocks)
    owner = np.full(n_blocks, -1, dtype=np.int64)
    quantizable = np.zeros(n_blocks, dtype=bool)
    router_bytes = np.zeros(len(drop), dtype=np.int64)
    fixed_bytes = fixed_read = 0
    for b, block in enumerate(arch.blocks):
        quantizable[b] = block.quantizable
        if block.is_routed_expert:
            owner[b] = gid[(block.layer, block.expert)]
            if not block.quantizable:
                raise InputError(f"block {block.name}: routed-expert blocks must be quantizable")
            continue
        if block.quantizable:
            continue
        nbytes = block_bytes(block, block.fixed_format)
        i = layer_pos.get(block.layer)
        if block.kind == BlockKind.ROUTER and i is not None and block.shape[0] == E[i]:
            if nbytes % E[i]:
                raise InputError(f"block {block.name}: router bytes {nbytes} do not split evenly over {E[i]} experts")
            router_bytes[first[i]:first[i] + E[i]] += nbytes // E[i]
        else:
            fixed_bytes += nbytes
            fixed_read += nbytes
    table = bytes_table(arch, formats)  # [blocks, formats], -1 where the format cannot store the block
    if options.target == Target.LLAMACPP:
        table = _llamacpp_storable(arch, formats, table)
    cost = _format_costs(profile, objective, formats)
    read = _read_bytes(profile, table, formats)
    pair_block, pair_format = np.nonzero((table >= 0) & quantizable[:, None])
    unstorable = np.flatnonzero(quantizable & ~np.any(table >= 0, axis=1))
    if len(unstorable):
        blk = arch.blocks[int(unstorable[0])]
        raise InputError(f"block {blk.name} (shape {list(blk.shape)}) cannot be stored in any candidate format")
    pair_bytes = table[pair_block, pair_format].astype(np.int64)
    pair_cost = cost[pair_block, pair_format]
    if np.any(~np.isfinite(pair_cost)):
        b = int(pair_block[np.flatnonzero(~np.isfinite(pair_cost))[0]])
        raise InputError(f"profile.sensitivity: block {arch.blocks[b].name} has no value for a candidate format")
    pair_read = read[pair_block, pair_format]
    removed = 0
    if options.presolve:
        group_key = _dominance_groups(arch, owner, options.target)
        keep_mask = _undominated(pair_block, pair_bytes, pair_read if options.min_tokens_per_s else pair_bytes,
                                 pair_cost, group_key, pair_format)
        removed = int((~keep_mask).sum())
        pair_block, pair_format = pair_block[keep_mask], pair_format[keep_mask]
        pair_bytes, pair_cost, pair_read = pair_bytes[keep_mask], pair_cost[keep_mask], pair_read[keep_mask]
    ptr = np.zeros(n_blocks + 1, dtype=np.int64)
    np.add.at(ptr, pair_block + 1, 1)
    ptr = np.cumsum(ptr)
    return Instance(
        profile=profile, options=options, budget=budget, objective=objective, formats=formats,
        layer_experts=E, layer_top_k=K, layer_min_experts=min_exp, layer_first_expert=first,
        topk_cost=tuple(np.asarray(t, float) for t in objective.topk), min_top_k=options.min_top_k,
        groups=G, topk_groups=TG, expert_layer=expert_layer, expert_local=expert_local, expert_group=expert_group,
        drop_cost=drop, router_bytes=router_bytes, block_owner=owner, block_quantizable=quantizable,
        pair_block=pair_block, pair_format=pair_format, pair_bytes=pair_bytes, pair_read=pair_read,
        pair_cost=pair_cost, pair_ptr=ptr, fixed_bytes=int(fixed_bytes), fixed_read=int(fixed_read),
        removed_pairs=removed,
    )


def _llamacpp_storable(arch: Architecture, formats: tuple[str, ...], table: np.ndarray) -> np.ndarray:
    """``table`` with -1 where llama.cpp stores a block as tensors whose rows a format does not divide (DeepSeek's
    ``kv_b_proj`` becomes ``attn_k_b`` with rows of ``qk_nope_head_dim``): llama-quantize would fall back there
    and the plan's bytes would be wrong. The bytes of the formats that stay are unchanged (same elements)."""
    out = table.copy()
    fmts = [get_format(f) for f in formats]
    for b, (block, rows) in enumerate(zip(arch.blocks, all_gguf_row_lengths(arch))):
        if block.quantizable and rows != (block.shape[-1],):
            for j, fmt in enumerate(fmts):
                if any(r % fmt.block_elements for r in rows):
                    out[b, j] = -1
    return out


def _candidate_formats(profile: Profile, options: FormulationOptions) -> tuple[str, ...]:
    names = profile.formats if options.formats is None else options.formats
    out = []
    for n in names:
        name = get_format(n).name
        if name not in profile.sensitivity.formats:
            raise InputError(f"--formats: the profile has no sensitivity for {name}; "
                             f"it has {', '.join(profile.sensitivity.formats)}")
        if name not in out:
            out.append(name)
    if not out:
        raise InputError("--formats: no candidate formats")
    return tuple(out)


def _min_experts(value: float, E: np.ndarray, min_top_k: int) -> np.ndarray:
    if not math.isfinite(value) or value < 0:
        raise InputError(f"--min-experts: must be >= 0, got {value}")
    counts = np.ceil(value * E).astype(int) if value < 1 else np.full(len(E), int(math.ceil(value)))
    if np.any(counts > E):
        raise InputError(f"--min-experts: {value} exceeds the number of experts of a layer ({int(E.min())})")
    return np.maximum(counts, min_top_k)


def _format_costs(profile: Profile, objective: ObjectiveTerms, formats: tuple[str, ...]) -> np.ndarray:
    cols = [profile.sensitivity.formats.index(f) for f in formats]
    return np.asarray(objective.format_cost, float)[:, cols]


def _read_bytes(profile: Profile, table: np.ndarray, formats: tuple[str, ...]) -> np.ndarray:
    """Bytes-equivalent read per decoded token: bytes * bandwidth / throughput(format), rounded up.

    A format whose measured dequant+matmul throughput is below the memory bandwidth costs proportionally
    more time per byte; an embedding reads one row per token, unless the head is tied to it (no ``lm_head``
    block): then the same matrix is the output projection and is read whole.
    """
    bw = profile.device.memory_bandwidth_bytes_per_s
    slow = np.array([max(1.0, bw / profile.device.format_throughput[f])
                     if profile.device.format_throughput.get(f) else 1.0
                     for f in formats])
    read = np.where(table >= 0, np.ceil(table * slow[None, :]), -1).astype(np.int64)
    for b, block in enumerate(profile.architecture.blocks):
        if block.kind == BlockKind.EMBEDDING and not profile.architecture.tied_head:
            read[b] = np.where(read[b] >= 0, -(-read[b] // block.shape[0]), -1)
    return read


def _dominance_groups(arch, owner: np.ndarray, target: Target) -> np.ndarray:
    """Blocks that must share a format choice form one dominance group (llamacpp: a (layer, projection))."""
    key = np.arange(len(arch.blocks))
    if target == Target.LLAMACPP:
        seen: dict[tuple, int] = {}
        for b, block in enumerate(arch.blocks):
            if block.is_routed_expert:
                key[b] = seen.setdefault((block.layer, block.projection), b)
    return key


def _undominated(pb: np.ndarray, nbytes: np.ndarray, read: np.ndarray, cost: np.ndarray, group: np.ndarray,
                 fidx: np.ndarray) -> np.ndarray:
    """Mask of pairs no other format of the same block dominates (for every block of its group).

    f is dominated by g when bytes_g <= bytes_f, read_g <= read_f and cost_g <= cost_f for all blocks of
    the group, with one strict inequality or, on an exact tie, g listed first.
    """
    n_blocks = int(pb.max()) + 1 if pb.size else 0
    F = int(fidx.max()) + 1 if fidx.size else 0
    inf = np.inf
    Bm = np.full((n_blocks, F), inf)
    Rm = np.full((n_blocks, F), inf)
    Cm = np.full((n_blocks, F), inf)
    Bm[pb, fidx], Rm[pb, fidx], Cm[pb, fidx] = nbytes, read, cost
    _, gidx = np.unique(group[:n_blocks], return_inverse=True)
    singletons = gidx.max(initial=-1) + 1 == n_blocks
    dominated = np.zeros((n_blocks, F), dtype=bool)
    for g in range(F):
        for f in range(F):
            if f == g:
                continue
            le = (Bm[:, g] <= Bm[:, f]) & (Rm[:, g] <= Rm[:, f]) & (Cm[:, g] <= Cm[:, f]) & np.isfinite(Bm[:, g])
            strict = (Bm[:, g] < Bm[:, f]) | (Rm[:, g] < Rm[:, f]) | (Cm[:, g] < Cm[:, f])
            if not singletons:  # the whole group must agree
                n_groups = int(gidx.max()) + 1
                all_le = np.bincount(gidx, weights=~le, minlength=n_groups) == 0
                any_strict = np.bincount(gidx, weights=strict, minlength=n_groups) > 0
                le, strict = all_le[gidx], any_strict[gidx]
            dominated[:, f] |= le & (strict | (g < f)) & np.isfinite(Bm[:, f])
    return ~dominated[pb, fidx]
