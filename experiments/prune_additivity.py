"""Do single-expert prune costs add up within a layer? Measure cumulative pruning against the profile's sum.

For each chosen MoE layer, the experts are ordered by the profile's predicted prune cost (the optimizer's
``predicted_loss`` drop term: measured where measured, else the routing-mass fit), and the j cheapest are
masked together (``runtime.moe.mask_experts``), j = 1..E-1. The measured KL(original || pruned) per token
over the profile's calibration windows is compared with what the profile predicts for the same plan: the
sum of the j drop terms plus the layer's top-k cost at k = min(top_k, E - j) (fewer experts than k leaves
only E - j routed). One tidy row per (layer, j).

Reproduce (numbers in docs/profiling.md, R3):

    python -m experiments.prune_additivity --model cache/r3 --profile experiments/profiles/r3/english.json \
        --layers 5,15,25 --out experiments/results/prune_additivity_r3.csv
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.entry import run_main
from experiments.results_io import write_rows
from optimizer.errors import InputError
from optimizer.jsonio import read_json


@dataclass(frozen=True)
class Config:
    model: str
    profile: str
    layers: tuple[int, ...]  # MoE layer indices (model layer numbers)
    max_tokens: int | None = None  # default: the profile's calibration tokens
    out: str | None = None


@contextmanager
def _pruned(model, layer: int, masked: list[int], k: int, mask_experts, top_k_set):
    """``masked`` experts of ``layer`` removed from routing, with k lowered first where fewer remain."""
    with ExitStack() as stack:
        stack.enter_context(top_k_set(model, layer, k))
        stack.enter_context(mask_experts(model, {layer: masked}))
        yield


def run(cfg: Config) -> list[dict]:
    from optimizer.formulation.objectives import build_objective
    from optimizer.profile import load_profile
    from profiling.engine import Engine, Perturbation
    from profiling.measure import top_k_set
    from profiling.model_io import Runner, load_text, token_windows
    from profiling.run import details_path
    from runtime.evaluate import tokenize
    from runtime.moe import mask_experts

    profile = load_profile(cfg.profile)
    details_file = details_path(Path(cfg.profile))
    if not details_file.is_file():
        raise InputError(f"--profile: {details_file} is missing; this study needs the details file that "
                         "`python -m profiling run` writes beside the profile (calibration text and windows)")
    details, _ = read_json(details_file)
    terms = build_objective(profile, "predicted_loss")
    moe = {m.index: i for i, m in enumerate(profile.architecture.moe_layers)}
    unknown = [layer for layer in cfg.layers if layer not in moe]
    if unknown:
        raise InputError(f"--layers: layer {unknown[0]} is not an MoE layer of this model")
    text, _ = load_text(details["data"])
    inputs, targets = token_windows(tokenize(Path(cfg.model), text), cfg.max_tokens or details["tokens"],
                                    details["window"])
    runner = Runner(cfg.model)
    engine = Engine(runner, inputs, targets, progress=False)
    engine.reference()
    model = runner.model
    perts, plan = [], {}
    for layer in cfg.layers:
        i = moe[layer]
        m = profile.architecture.moe_layers[i]
        drop = np.asarray(terms.drop[i], dtype=float)
        order = np.argsort(drop, kind="stable")
        for j in range(1, m.num_experts):
            masked = [int(e) for e in order[:j]]
            k = min(m.top_k, m.num_experts - j)
            predicted = float(drop[order[:j]].sum() + terms.topk[i][k - 1])
            plan[(layer, j)] = (masked, k, predicted, float(drop[order[:j]].sum()))
            perts.append(Perturbation((layer, j), layer, lambda layer=layer, masked=masked, k=k:
                                      _pruned(model, layer, masked, k, mask_experts, top_k_set)))
    t0 = time.perf_counter()
    effects = engine.evaluate(perts, "cumulative pruning")
    rows = []
    for (layer, j), eff in sorted(effects.items()):
        masked, k, predicted, drop_sum = plan[(layer, j)]
        rows.append({"layer": layer, "pruned": j, "effective_k": k, "predicted_kl": round(predicted, 6),
                     "sum_single_prune": round(drop_sum, 6), "measured_kl": round(eff.kl, 6),
                     "measured_nll": round(eff.dnll, 6),
                     "ratio_measured_over_predicted": round(eff.kl / predicted, 4) if predicted > 0 else None})
    print(f"{len(rows)} cumulative prunings in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--layers", required=True, help="comma-separated MoE layer numbers")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = Config(a.model, a.profile, tuple(int(x) for x in a.layers.split(",")), a.max_tokens, a.out)
    rows = run(cfg)
    for r in rows:
        print(r)
    if cfg.out:
        write_rows(cfg.out, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
