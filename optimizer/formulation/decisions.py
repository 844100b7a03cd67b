"""Decisions in instance terms (which experts, which k, which format per block), and their conversions.

Every solver, baseline and heuristic produces :class:`Decisions`; :func:`to_vector` turns them into a full
MILP point (for warm starts and for checking them against every constraint of the model), and
:func:`from_vector` reads them back from a solver's point.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..milp import MilpModel
from .constraints import Variables
from .instance import Instance


@dataclass(frozen=True, eq=False)
class Decisions:
    keep: np.ndarray  # bool per global expert
    top_k: np.ndarray  # int per MoE layer
    chosen: np.ndarray  # bool per candidate pair (exactly one per present block)

    def objective(self, inst: Instance) -> float:
        """Predicted loss increase: drop costs, format costs, top-k costs and prune-count costs (nats/token)."""
        drop = float(inst.drop_cost[~self.keep].sum())
        fmt = float(inst.pair_cost[self.chosen].sum())
        topk = float(sum(inst.topk_cost[i][k - 1] for i, k in enumerate(self.top_k)))
        return drop + fmt + topk + self.count_cost(inst)

    def count_cost(self, inst: Instance) -> float:
        """sum_i g_i(experts pruned in layer i): the prune curves' correction (0 without curves)."""
        if inst.prune_count_cost is None:
            return 0.0
        kept = np.bincount(inst.expert_layer[self.keep], minlength=len(inst.layer_top_k))
        return float(sum(g[E - k] for g, E, k in zip(inst.prune_count_cost, inst.layer_experts, kept)))

    def weight_bytes(self, inst: Instance) -> int:
        """Bytes of all weights: chosen formats, router rows of kept experts, fixed tensors."""
        return int(inst.pair_bytes[self.chosen].sum() + inst.router_bytes[self.keep].sum() + inst.fixed_bytes)


def to_vector(inst: Instance, model: MilpModel, v: Variables, d: Decisions) -> np.ndarray:
    """The MILP point of ``d`` (auxiliary variables m, N, z, c, w, u filled consistently)."""
    x = np.zeros(model.num_vars)
    x[v.x] = d.chosen
    x[v.keep] = d.keep
    for i, (cols, ks) in enumerate(zip(v.y, v.k_values)):
        x[cols[ks == d.top_k[i]]] = 1.0
    kept = np.bincount(inst.expert_layer[d.keep], minlength=len(inst.layer_top_k))
    if v.m is not None:
        x[v.m] = kept // inst.groups
    if v.u is not None:
        for cols, E, k in zip(v.u, inst.layer_experts, kept):
            if E - k < len(cols):
                x[cols[E - k]] = 1.0
    if v.n_global is not None:
        x[v.n_global] = int(d.keep[inst.layer_first_expert[0]:inst.layer_first_expert[0] + inst.layer_experts[0]].sum())
    if v.z is not None:
        P, F = len(inst.profile.architecture.expert_projections), len(inst.formats)
        projections = list(inst.profile.architecture.expert_projections)
        arch = inst.profile.architecture
        for p_idx in np.flatnonzero(d.chosen):
            b = inst.pair_block[p_idx]
            g = inst.block_owner[b]
            if g >= 0:
                proj = projections.index(arch.blocks[b].projection)
                x[v.z[(inst.expert_layer[g] * P + proj) * F + inst.pair_format[p_idx]]] = 1.0
        # layers with no kept expert still need one z per projection: take the first usable format
        zz = x[v.z].reshape(-1, F)
        for r in np.flatnonzero(zz.sum(axis=1) == 0):
            x[v.z[r * F + int(np.argmin(model.col_upper[v.z[r * F:(r + 1) * F]] == 0))]] = 1.0
    if "c" in model.col_families:
        c, w = model.col_families["c"], model.col_families["w"]
        per_expert = np.zeros(inst.num_experts)
        chosen = np.flatnonzero(d.chosen)
        owners = inst.block_owner[inst.pair_block[chosen]]
        mask = owners >= 0
        np.add.at(per_expert, owners[mask], inst.pair_read[chosen[mask]])
        layer_max = np.zeros(len(inst.layer_top_k))
        np.maximum.at(layer_max, inst.expert_layer, per_expert)
        x[c] = layer_max
        ys = np.concatenate(v.y)
        layer_of_y = np.concatenate([np.full(len(y), i) for i, y in enumerate(v.y)])
        x[w] = layer_max[layer_of_y] * x[ys]
    return x


def from_vector(inst: Instance, v: Variables, x: np.ndarray) -> Decisions:
    xr = np.round(x).astype(int)
    top_k = np.array([int(ks[np.argmax(xr[cols])]) for cols, ks in zip(v.y, v.k_values)])
    return Decisions(keep=xr[v.keep].astype(bool), top_k=top_k, chosen=xr[v.x].astype(bool))


def check_decisions(inst: Instance, model: MilpModel, v: Variables, d: Decisions) -> list[str]:
    """Names of the constraint families ``d`` violates (empty when it is a valid plan)."""
    return model.violated_families(to_vector(inst, model, v, d), tol=1e-6)

