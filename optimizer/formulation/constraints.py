"""The joint ILP over kept experts, per-layer top-k and per-block formats. Imports no solver.

Sets: MoE layers i (E_i experts, original top-k K_i), experts e of layer i, blocks b, candidate formats
F_b of block b (:mod:`.instance`), expert groups g (DeepSeek's ``n_group``, G groups, TG selected per token).

Variables (all binary unless said):
    keep[i,e]        expert e of layer i is kept
    y[i,k]           layer i routes to k experts, k in [k_min, K_i]           (one-hot per layer)
    x[b,f]           block b is stored in format f                              (one-hot per present block)
    m[i]  integer    experts kept per group of layer i                         (group-limited routing only)
    N     integer    experts kept per layer, the same in all layers            (--target llamacpp only)
    z[i,p,f]         format f for projection p of every expert of layer i      (--target llamacpp only)
    c[i], w[i,k] integer  bytes of layer i's largest kept expert, and c[i]*y[i,k]  (--min-tokens-per-s only)
    u[i,n]           layer i prunes exactly n experts, n in [0, E_i - min_i]   (one-hot; prune curves only)

Objective (minimise, nats/token, :mod:`.objectives`):
    sum_{i,e} drop[i,e] (1 - keep[i,e]) + sum_{b,f} sens[b,f] x[b,f] + sum_{i,k} topk[i,k] y[i,k]
    + sum_{i,n} g[i,n] u[i,n]                                         (prune curves' count term, if any)

Constraints:
    (1) bytes:    sum_{b,f} bytes[b,f] x[b,f] + sum_{i,e} router_row_bytes[i] keep[i,e] <= budget - reserves - fixed
        (0) with:  sum_f x[b,f] = keep[i(b), e(b)]  for a routed-expert block,  = 1  for any other block
    (2) experts:  sum_e keep[i,e] >= sum_k k y[i,k];   sum_e keep[i,e] >= min_i;   sum_k y[i,k] = 1
    (3) groups:   sum_{e in g} keep[i,e] = m[i] for every group g (the router reshapes scores into G equal
                  groups); m[i] >= 2 (a group's score is the sum of its top-2); TG m[i] >= sum_k k y[i,k]
                  (the TG selected groups must hold k experts)
    (4) llamacpp: x[b,f] <= z[i,p,f] for every expert block b of (i,p); sum_f z[i,p,f] = 1;
                  sum_e keep[i,e] = N for every i; y[i,k] = y[k] (one global k)
    (5) speed:    read(non-expert blocks) + sum_i sum_k k w[i,k] <= bandwidth (1 / min_tokens_per_s - overhead), where
                  c[i] >= sum_{b of e, f} read[b,f] x[b,f] for every expert e of layer i, and
                  w[i,k] >= c[i] - Cmax_i (1 - y[i,k]), w >= 0 (McCormick: since w only appears on the
                  left of a <= row it settles at exactly c[i] y[i,k]). The decode time of layer i is priced as
                  k_i times its *largest* kept expert: exact when a layer's experts share formats (llamacpp,
                  uniform plans), otherwise an upper bound, so a plan never breaks the speed target under the
                  bandwidth model. read[b,f] = bytes * bandwidth / measured throughput(f) (>= bytes).
    (6) count:    sum_n u[i,n] = 1;  sum_e keep[i,e] + sum_n n u[i,n] = E_i   (prices n with any curve g, exactly)
Every family of rows is built by its own function below.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..milp import INF, MilpBuilder, MilpModel
from ..plan import Target
from .instance import Instance


@dataclass(eq=False)
class Variables:
    keep: np.ndarray  # [experts]
    y: list[np.ndarray]  # per MoE layer: columns for k = k_min..K_i (llamacpp: the same columns in all layers)
    x: np.ndarray  # [pairs]
    k_values: list[np.ndarray]  # the k of each y column
    m: np.ndarray | None = None
    n_global: np.ndarray | None = None
    z: np.ndarray | None = None
    u: list[np.ndarray] | None = None  # per MoE layer: columns for n = 0..E_i - min_i experts pruned


def build_milp(inst: Instance) -> tuple[MilpModel, Variables]:
    """Assemble the model: variables with their objective costs, then constraint families (0)-(5)."""
    mb = MilpBuilder()
    v = _variables(mb, inst)
    one_hot_formats(mb, inst, v)
    byte_budget(mb, inst, v)
    expert_counts(mb, inst, v)
    if inst.groups > 1:
        group_limited_routing(mb, inst, v)
    if inst.options.target == Target.LLAMACPP:
        llamacpp_ties(mb, inst, v)
    if inst.options.min_tokens_per_s is not None:
        decode_speed(mb, inst, v)
    if inst.prune_count_cost is not None:
        prune_count(mb, inst, v)
    return mb.build(), v


def _variables(mb: MilpBuilder, inst: Instance) -> Variables:
    x = mb.add_vars("x", len(inst.pair_block), cost=inst.pair_cost)
    keep = mb.add_vars("keep", inst.num_experts, cost=-inst.drop_cost)
    mb.offset += float(inst.drop_cost.sum())
    kmin = inst.min_top_k
    if inst.options.target == Target.LLAMACPP:
        K = int(inst.layer_top_k[0])
        ks = np.arange(kmin, K + 1)
        cost = sum(t[kmin - 1:] for t in inst.topk_cost)
        y_global = mb.add_vars("y", len(ks), cost=cost)
        y = [y_global] * len(inst.layer_top_k)
        k_values = [ks] * len(inst.layer_top_k)
    else:
        ks_all = [np.arange(kmin, int(K) + 1) for K in inst.layer_top_k]
        cols = mb.add_vars("y", sum(len(k) for k in ks_all),
                           cost=np.concatenate([t[kmin - 1:] for t in inst.topk_cost]))
        y, k_values, start = [], ks_all, 0
        for ks in ks_all:
            y.append(cols[start:start + len(ks)])
            start += len(ks)
    return Variables(keep=keep, y=y, x=x, k_values=k_values)


def one_hot_formats(mb: MilpBuilder, inst: Instance, v: Variables) -> None:
    """(0) Each present block takes exactly one format; an expert's blocks exist only if it is kept."""
    blocks = np.flatnonzero(inst.block_quantizable)
    local = np.full(len(inst.block_owner), -1)
    local[blocks] = np.arange(len(blocks))
    rows = [local[inst.pair_block]]
    cols = [v.x]
    vals = [np.ones(len(v.x))]
    owners = inst.block_owner[blocks]
    is_expert = owners >= 0
    rows.append(np.flatnonzero(is_expert))
    cols.append(v.keep[owners[is_expert]])
    vals.append(-np.ones(int(is_expert.sum())))
    rhs = np.where(is_expert, 0.0, 1.0)
    mb.add_rows("(0) one format per block", np.concatenate(rows), np.concatenate(cols), np.concatenate(vals),
                rhs, rhs, count=len(blocks))


def byte_budget(mb: MilpBuilder, inst: Instance, v: Variables) -> None:
    """(1) Weights fit in the budget left after reserves and fixed (unquantized) tensors."""
    cols = np.concatenate([v.x, v.keep])
    vals = np.concatenate([inst.pair_bytes, inst.router_bytes]).astype(float)
    mb.add_rows("(1) bytes <= budget - reserves", np.zeros(len(cols), int), cols, vals,
                -INF, float(inst.capacity), count=1)


def _keep_rows(inst: Instance, v: Variables) -> tuple[np.ndarray, np.ndarray]:
    """(local row = layer, column = keep) triplets summing each layer's kept experts."""
    return inst.expert_layer, v.keep


def _k_terms(inst: Instance, v: Variables, coef: float = -1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = np.concatenate([np.full(len(ks), i) for i, ks in enumerate(v.k_values)])
    cols = np.concatenate(v.y)
    vals = coef * np.concatenate(v.k_values).astype(float)
    return rows, cols, vals


def expert_counts(mb: MilpBuilder, inst: Instance, v: Variables) -> None:
    """(2) One k per layer; kept experts >= k and >= the layer's minimum."""
    n = len(inst.layer_top_k)
    if inst.options.target == Target.LLAMACPP:
        mb.add_rows("(2) one top-k", np.zeros(len(v.y[0]), int), v.y[0], 1.0, 1.0, 1.0, count=1)
    else:
        rows = np.concatenate([np.full(len(y), i) for i, y in enumerate(v.y)])
        mb.add_rows("(2) one top-k per layer", rows, np.concatenate(v.y), 1.0, 1.0, 1.0, count=n)
    kr, kc = _keep_rows(inst, v)
    yr, yc, yv = _k_terms(inst, v)
    mb.add_rows("(2) kept experts >= k", np.concatenate([kr, yr]), np.concatenate([kc, yc]),
                np.concatenate([np.ones(len(kc)), yv]), 0.0, INF, count=n)
    mb.add_rows("(2) kept experts >= minimum", kr, kc, 1.0, inst.layer_min_experts.astype(float), INF, count=n)


def group_limited_routing(mb: MilpBuilder, inst: Instance, v: Variables) -> None:
    """(3) Equal kept count in every expert group (>= 2), and the selected groups can hold k experts."""
    n, G = len(inst.layer_top_k), inst.groups
    per_group = inst.layer_experts // G
    lower = np.minimum(2, per_group).astype(float)
    m = mb.add_vars("m", n, lower=lower, upper=per_group.astype(float), integer=True)
    rows = inst.expert_layer * G + inst.expert_group
    mrows = np.arange(n * G)
    mb.add_rows("(3) equal experts per group", np.concatenate([rows, mrows]), np.concatenate([v.keep, np.repeat(m, G)]),
                np.concatenate([np.ones(len(v.keep)), -np.ones(n * G)]), 0.0, 0.0, count=n * G)
    yr, yc, yv = _k_terms(inst, v)
    mb.add_rows("(3) selected groups hold k experts", np.concatenate([np.arange(n), yr]), np.concatenate([m, yc]),
                np.concatenate([np.full(n, float(inst.topk_groups)), yv]), 0.0, INF, count=n)
    v.m = m


def llamacpp_ties(mb: MilpBuilder, inst: Instance, v: Variables) -> None:
    """(4) One format per (layer, projection) across experts; the same number of experts in every layer."""
    arch = inst.profile.architecture
    projections = list(arch.expert_projections)
    P, F, n = len(projections), len(inst.formats), len(inst.layer_top_k)
    z = mb.add_vars("z", n * P * F)
    proj_of_block = np.full(len(arch.blocks), -1)
    for b, block in enumerate(arch.blocks):
        if block.is_routed_expert:
            proj_of_block[b] = projections.index(block.projection)
    expert_pairs = np.flatnonzero(inst.block_owner[inst.pair_block] >= 0)
    pb = inst.pair_block[expert_pairs]
    layer = inst.expert_layer[inst.block_owner[pb]]
    zcol = z[(layer * P + proj_of_block[pb]) * F + inst.pair_format[expert_pairs]]
    r = np.arange(len(expert_pairs))
    mb.add_rows("(4) expert format = layer format", np.concatenate([r, r]), np.concatenate([v.x[expert_pairs], zcol]),
                np.concatenate([np.ones(len(r)), -np.ones(len(r))]), -INF, 0.0, count=len(r))
    # formats no expert block of (i, p) can take are fixed to 0 by the one-hot over the usable ones
    usable = np.zeros(n * P * F, dtype=bool)
    usable[(layer * P + proj_of_block[pb]) * F + inst.pair_format[expert_pairs]] = True
    zi = np.flatnonzero(usable)
    mb.add_rows("(4) one format per layer and projection", zi // F, z[zi], 1.0, 1.0, 1.0, count=n * P)
    n_global = mb.add_vars("N", 1, lower=0.0, upper=float(inst.layer_experts.max()), integer=True)
    kr, kc = _keep_rows(inst, v)
    mb.add_rows("(4) same expert count in every layer", np.concatenate([kr, np.arange(n)]),
                np.concatenate([kc, np.repeat(n_global, n)]), np.concatenate([np.ones(len(kc)), -np.ones(n)]),
                0.0, 0.0, count=n)
    v.z = z
    v.n_global = n_global


def decode_speed(mb: MilpBuilder, inst: Instance, v: Variables) -> None:
    """(5) Bytes read per token over the measured bandwidth reach the requested tokens/s."""
    n = len(inst.layer_top_k)
    expert_pair = inst.block_owner[inst.pair_block] >= 0
    # c[i] >= read bytes of expert e, for every expert
    per_block_max = np.zeros(len(inst.block_owner))
    np.maximum.at(per_block_max, inst.pair_block[expert_pair], inst.pair_read[expert_pair])
    expert_max = np.zeros(inst.num_experts)
    np.add.at(expert_max, inst.block_owner[inst.block_owner >= 0], per_block_max[inst.block_owner >= 0])
    cmax = np.zeros(n)
    np.maximum.at(cmax, inst.expert_layer, expert_max)
    c = mb.add_vars("c", n, lower=0.0, upper=cmax, integer=True)
    e_of_pair = inst.block_owner[inst.pair_block[expert_pair]]
    rows = np.concatenate([e_of_pair, np.arange(inst.num_experts)])
    cols = np.concatenate([v.x[expert_pair], c[inst.expert_layer]])
    vals = np.concatenate([-inst.pair_read[expert_pair].astype(float), np.ones(inst.num_experts)])
    mb.add_rows("(5) largest expert of the layer", rows, cols, vals, 0.0, INF, count=inst.num_experts)
    # w[i,k] >= c[i] - Cmax_i (1 - y[i,k])  <=>  w - c - Cmax y >= -Cmax
    ys = np.concatenate(v.y)
    layer_of_y = np.concatenate([np.full(len(y), i) for i, y in enumerate(v.y)])
    w = mb.add_vars("w", len(ys), lower=0.0, upper=cmax[layer_of_y], integer=True)
    r = np.arange(len(ys))
    mb.add_rows("(5) w = c * y (McCormick)", np.concatenate([r, r, r]), np.concatenate([w, c[layer_of_y], ys]),
                np.concatenate([np.ones(len(r)), -np.ones(len(r)), -cmax[layer_of_y]]), -cmax[layer_of_y], INF,
                count=len(r))
    nonexpert = ~expert_pair
    cols = np.concatenate([v.x[nonexpert], w, v.keep])
    kvals = np.concatenate(v.k_values).astype(float)
    # router rows are read for every token (a kept expert's row costs its bytes)
    vals = np.concatenate([inst.pair_read[nonexpert].astype(float), kvals, inst.router_bytes.astype(float)])
    mb.add_rows("(5) bytes read per token <= bandwidth / tokens_per_s", np.zeros(len(cols), int), cols, vals,
                -INF, inst.read_limit, count=1)


def prune_count(mb: MilpBuilder, inst: Instance, v: Variables) -> None:
    """(6) One pruned count per layer, tied to the kept experts; its column carries the curve's g[i, n]."""
    counts = [np.arange(int(E) - int(lo) + 1) for E, lo in zip(inst.layer_experts, inst.layer_min_experts)]
    cols = mb.add_vars("u", sum(len(n) for n in counts),
                       cost=np.concatenate([np.asarray(g, float)[n] for g, n in zip(inst.prune_count_cost, counts)]))
    v.u = np.split(cols, np.cumsum([len(n) for n in counts])[:-1])
    rows = np.concatenate([np.full(len(n), i) for i, n in enumerate(counts)])
    nl = len(counts)
    mb.add_rows("(6) one pruned count per layer", rows, cols, 1.0, 1.0, 1.0, count=nl)
    kr, kc = _keep_rows(inst, v)
    experts = inst.layer_experts.astype(float)
    mb.add_rows("(6) kept + pruned = experts", np.concatenate([kr, rows]), np.concatenate([kc, cols]),
                np.concatenate([np.ones(len(kc))] + [n.astype(float) for n in counts]), experts, experts, count=nl)
