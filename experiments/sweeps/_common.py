"""Cell lists shared by the reference-model sweeps: the methods compared at every budget."""
from __future__ import annotations

from experiments.sweep import Cell, Sweep, grid, with_fields

FORMULATIONS = ("predicted_loss", "importance", "routing_mass", "saliency")
ABLATIONS = ("quantize_only", "prune_only:BF16", "no_topk")
BASELINES = ("greedy", "sequential", "llamacpp")
#: a budget every uniform plan fits: a uniform plan does not depend on the budget, so each format is one cell
#: and the report places it at its own bytes
UNIFORM_BUDGET = "1TB"


def method_cells(model: str, profile: str, budgets: tuple[str, ...], formats: tuple[str, ...],
                 eval_tokens: int) -> list[Cell]:
    """The plan refine hands over, the joint ILP under every formulation, its ablations and the baselines at
    every budget, and one uniform plan per format."""
    common = dict(model=model, profile=profile, eval_tokens=eval_tokens)
    return (grid(**common, budget=budgets, method="refine")
            + grid(**common, budget=budgets, method="ilp", formulation=FORMULATIONS)
            + grid(**common, budget=budgets, method=ABLATIONS + BASELINES)
            + grid(**common, budget=UNIFORM_BUDGET, method=tuple(f"uniform:{f}" for f in formats)))


def shift_cells(model: str, profiles: dict[str, str], budgets: tuple[str, ...], corpora: tuple[str, ...],
                eval_tokens: int) -> list[Cell]:
    """Calibration shift: the joint ILP from a profile calibrated on each domain, evaluated on each corpus."""
    return [c for domain, profile in profiles.items()
            for c in grid(model=model, profile=profile, budget=budgets, method="ilp", eval_corpus=corpora,
                          eval_tokens=eval_tokens)]


def curves_sweep(name: str, label: str, model: str, profile: str, budgets: tuple[str, ...],
                 formats: tuple[str, ...], eval_tokens: int, smoke_budget: str) -> Sweep:
    """A model through the calibrate / prune-curve / fit-prediction pipeline: the plan refine hands over, the
    joint ILP and mixed precision alone at every budget, and one uniform plan per format (``r1_curves``...)."""
    common = dict(model=model, profile=profile, eval_tokens=eval_tokens)
    return Sweep(
        name=name,
        cells=tuple(grid(**common, budget=budgets, method=("refine", "ilp", "quantize_only"))
                    + grid(**common, budget=UNIFORM_BUDGET, method=tuple(f"uniform:{f}" for f in formats))),
        smoke=tuple(with_fields(grid(model=model, profile=profile, budget=smoke_budget, method=("ilp",)),
                                eval_tokens=512)),
        description=f"{label}, calibrated costs with prune curves and a KL map: refine, ILP, mixed "
                    "precision, uniform",
    )
