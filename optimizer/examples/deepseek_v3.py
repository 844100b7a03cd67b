"""A full-scale DeepSeek-V3 (671B) profile from real routing statistics and a documented prior; the same prior
for any supported MoE config, so a model can be planned and sized before its weights are downloaded.

Reproduce: ``python -m optimizer example -o examples/deepseek-v3/profile.json.gz``
Any model: ``python -m optimizer example --config config.json [--scores SCORES.json] -o profile.json``
(``SCORES``: per layer ``{"layer_N": {"scores": [...], "activations": [...]}}`` as DeepSeek's release; without
it every expert gets an equal share of routing: frequency 1/E, routing mass 1/E, mean score 1/k, all marked
``prior``).

What is real: the architecture (``data/deepseek_v3/config_671B.json``: 61 layers, 58 MoE layers of 256
routed + 1 shared experts, top-8, 8 groups / 4 selected, MLA) and the per-expert routing statistics of
DeepSeek-V3-0324 on ~1.6M MMLU tokens released with CC-MoE (MIT, ``expert_scores_seqlen_8k.json``):
per layer, summed routing weight (``scores``) and selection counts (``activations``). From them:
frequency = activations / (tokens * 8), mean score = scores / activations, routing mass = scores / sum.

What is a PRIOR (no weights are available here; every such section says ``prior: true``):

* sensitivity: ``sens[b,f] = w_b * eps(f)``, with ``eps(f) = 4^-(bpw_f - 0.5)`` for quantized formats (the
  noise power of a b-bit quantizer falls 4x per bit; half a bit is scale overhead) and 0 for BF16 (the
  checkpoint's precision). Block weights ``w_b`` split a total of ``TOTAL_WEIGHT`` nats per unit noise over
  kinds (routed experts 50%, attention 25%, shared experts 10%, dense MLPs 5%, lm_head 7%, embedding 3%;
  every quantized block gets its kind's share), output projections (``down_proj``, ``o_proj``) 1.5x the
  others of their kind, the first and last 3 layers 1.5x (llama.cpp's "more bits" rule); a routed expert's
  share is proportional to its routing mass. Calibrated so that uniform Q4_K costs ~0.02 nats/token (+2%
  perplexity) and Q2_K ~0.26.
* prune cost: ``GAMMA * routing-mass share`` (dropping a layer's entire routed mass costs GAMMA nats).
* top-k cost: routing to k < 8 experts loses the mass of ranks k+1..8 under a geometric rank profile
  (rank r holds a share proportional to RHO^(r-1)), priced at GAMMA nats per unit mass.
* device: 256 GB/s memory bandwidth (a 128 GB LPDDR5X-8000 laptop class machine), not measured.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

from ..architectures import architecture_from_config
from ..errors import InputError
from ..formats import get_format
from ..model_spec import BlockKind
from ..profile import Device, ExpertStats, Measurement, ModelInfo, Profile, Sensitivity, TopkCost

FORMATS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "Q2_K", "IQ3_XXS", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K",
           "Q8_0", "BF16")
TOTAL_WEIGHT = 5.0
KIND_SHARE = {BlockKind.ROUTED_EXPERT: 0.50, BlockKind.ATTENTION: 0.25, BlockKind.SHARED_EXPERT: 0.10,
              BlockKind.DENSE_MLP: 0.05, BlockKind.LM_HEAD: 0.07, BlockKind.EMBEDDING: 0.03}
GAMMA = 0.015
RHO = 0.8
BANDWIDTH = 256e9
SOURCE = ("DeepSeek-V3 architecture (config_671B.json) and DeepSeek-V3-0324 routing statistics on MMLU, "
          "released with CC-MoE (arXiv 2509.25689, MIT licence)")


def _data(name: str) -> dict:
    return json.loads(resources.files("optimizer").joinpath("data", "deepseek_v3", name).read_text())


def format_noise(name: str) -> float:
    """Prior relative noise power of a format: 4^-(bpw - 0.5), 0 for the checkpoint's BF16 and wider."""
    fmt = get_format(name)
    return 0.0 if not fmt.quantized else 4.0 ** (-(fmt.bits_per_weight - 0.5))


def build_deepseek_v3_profile(formats: tuple[str, ...] = FORMATS) -> Profile:
    return build_prior_profile(_data("config_671B.json"), "DeepSeek-V3-671B", _data("expert_scores_seqlen_8k.json"),
                               formats, source=SOURCE, where="config_671B.json")


def build_prior_profile(config: dict, name: str, scores: dict | None = None, formats: tuple[str, ...] = FORMATS,
                        source: str = "", where: str = "config") -> Profile:
    """A profile of ``config``'s architecture: routing statistics from ``scores`` (or equal shares, marked
    prior), and the documented prior for sensitivity, prune and top-k costs (module docstring)."""
    arch = architecture_from_config(config, where=where)
    if scores is not None:
        freq, score, mass, tokens = _routing_from_scores(arch, scores)
        real = Measurement(method="router statistics of DeepSeek-V3-0324 on MMLU test prompts in 8k-token chunks"
                           if source == SOURCE else "router statistics from --scores (per layer scores, activations)",
                           tokens=tokens, source=source)
    else:
        freq = tuple(np.full(m.num_experts, 1.0 / m.num_experts) for m in arch.moe_layers)
        score = tuple(np.full(m.num_experts, 1.0 / m.top_k) for m in arch.moe_layers)
        mass = tuple(np.full(m.num_experts, 1.0 / m.num_experts) for m in arch.moe_layers)
        real = Measurement(method="prior: no routing statistics; every expert an equal share (frequency and routing "
                                  "mass 1/E, mean score 1/k)", prior=True)
    mass_of = {(m.index, e): mass[i][e] for i, m in enumerate(arch.moe_layers) for e in range(m.num_experts)}
    values = _prior_sensitivity(arch, formats, mass_of)
    prune_prior = Measurement(method=f"prior: {GAMMA} nats x routing-mass share (not measured)", prior=True)
    sens_prior = Measurement(method="prior: w_b * 4^-(bpw-0.5), w_b by kind/projection/layer/routing mass "
                                    "(see optimizer/examples/deepseek_v3.py; not measured)", prior=True)
    topk = []
    for m in arch.moe_layers:
        ranks = RHO ** np.arange(m.top_k)
        ranks /= ranks.sum()
        topk.append(np.array([GAMMA * ranks[k:].sum() for k in range(1, m.top_k + 1)]))
    topk_prior = Measurement(method=f"prior: {GAMMA} nats x routing mass beyond rank k, geometric ranks rho={RHO}",
                             prior=True)
    return Profile(
        model=ModelInfo(name=name, source=source), architecture=arch,
        formats=tuple(get_format(f).name for f in formats),
        experts=ExpertStats(tuple(freq), tuple(score), tuple(mass), None,
                            tuple(GAMMA * m for m in mass), real, prune_prior),
        sensitivity=Sensitivity(tuple(get_format(f).name for f in formats), values, sens_prior),
        topk_cost=TopkCost(tuple(topk), topk_prior),
        device=Device(BANDWIDTH, Measurement(method="prior: 256 GB/s laptop-class memory bandwidth", prior=True)),
    )


def _routing_from_scores(arch, stats: dict) -> tuple[tuple, tuple, tuple, int | None]:
    """(frequency, mean score, routing mass per MoE layer, tokens) from per-layer summed scores and counts."""
    freq, score, mass = [], [], []
    tokens = None
    for m in arch.moe_layers:
        layer = stats.get(f"layer_{m.index}")
        if not isinstance(layer, dict) or "scores" not in layer or "activations" not in layer:
            raise InputError(f"--scores: no 'layer_{m.index}' entry with 'scores' and 'activations'")
        s = np.asarray(layer["scores"], float)
        a = np.asarray(layer["activations"], float)
        if s.shape != (m.num_experts,) or a.shape != (m.num_experts,) or not (s >= 0).all() or s.sum() <= 0:
            raise InputError(f"--scores: layer_{m.index} needs {m.num_experts} nonnegative scores and activations")
        n_tokens = a.sum() / m.top_k
        tokens = int(round(n_tokens)) if tokens is None else tokens
        freq.append(a / max(n_tokens * m.top_k, 1.0))
        score.append(np.where(a > 0, s / np.maximum(a, 1), 0.0))
        mass.append(s / s.sum())
    return tuple(freq), tuple(score), tuple(mass), tokens


def _prior_sensitivity(arch, formats, mass_of) -> np.ndarray:
    noise = np.array([format_noise(f) for f in formats])
    fmts = [get_format(f) for f in formats]
    raw = np.zeros(len(arch.blocks))
    edge = {0, 1, 2, arch.num_layers - 3, arch.num_layers - 2, arch.num_layers - 1}
    for b, block in enumerate(arch.blocks):
        if not block.quantizable:
            continue
        w = 1.5 if block.projection in ("down_proj", "o_proj") else 1.0
        w *= 1.5 if block.layer in edge else 1.0
        if block.is_routed_expert:
            w *= mass_of[(block.layer, block.expert)]
        raw[b] = w
    # Masks compare the BlockKind members themselves: np.array([blk.kind ...]) would make a fixed-width
    # string array whose items are str(kind) cut to the value's length ('BlockKind.ATT'), which equals no kind.
    weight = np.zeros(len(arch.blocks))
    for kind, share in KIND_SHARE.items():
        mask = np.fromiter((blk.kind is kind for blk in arch.blocks), bool, len(arch.blocks))
        if raw[mask].sum() > 0:
            weight[mask] = TOTAL_WEIGHT * share * raw[mask] / raw[mask].sum()
    unpriced = {blk.kind for blk in arch.blocks if blk.quantizable} - set(KIND_SHARE)
    if unpriced:
        raise ValueError(f"no prior share for block kinds {sorted(k.value for k in unpriced)}")
    values = np.full((len(arch.blocks), len(formats)), np.nan)
    for b, block in enumerate(arch.blocks):
        if block.quantizable:
            ok = np.array([f.admits(block.shape) for f in fmts])
            values[b, ok] = weight[b] * noise[ok]
    return values
