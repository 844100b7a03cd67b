"""R3 with prune curves (``profiling prune-curve``): does pricing the number pruned per layer by a measured
curve, instead of summed single-expert costs, stop the joint ILP from losing to mixed precision alone?

    python -m profiling prune-curve experiments/profiles/r3/english-calibrated.json --model cache/r3 \\
        -o experiments/profiles/r3/english-calibrated-curves.json          # ~15 min on one core (150 points)
    python -m experiments run r3_curves --out docs/results/r3_curves --resume       # ~15 min on one core
    python -m experiments report docs/results/r3_curves

The profile is ``english-calibrated.json`` (the ``r3_calibrated`` sweep's) plus ``experiments.prune_curve``;
the protocol (first 4,096 tokens of the English test split, window 512, RTN in memory) is the same, so these
ILP rows compare directly with the ``r3_calibrated`` rows (ILP without curves, mixed precision alone,
uniform formats), which come from the identical profile without curves.
"""
from __future__ import annotations

from experiments.sweep import Sweep, grid, with_fields
from experiments.sweeps.r3 import BUDGETS, MODEL, TOKENS
from experiments.sweeps.r3_calibrated import BELOW_UNIFORM

PROFILE = "experiments/profiles/r3/english-calibrated-curves.json"

_common = dict(model=MODEL, profile=PROFILE, eval_tokens=TOKENS)
SWEEP = Sweep(
    name="r3_curves",
    cells=tuple(grid(**_common, budget=tuple(sorted(BUDGETS + BELOW_UNIFORM, key=lambda b: int(b[:-2]))),
                     method="ilp")),
    smoke=tuple(with_fields(grid(model=MODEL, profile=PROFILE, budget="110MB", method=("ilp",)), eval_tokens=512)),
    description="R3 (pretrained), calibrated format costs and measured prune curves: the joint ILP",
)
