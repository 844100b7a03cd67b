"""R3 with prune curves (``profiling prune-curve``): does pricing the number pruned per layer by a measured
curve, instead of summed single-expert costs, stop the joint ILP from losing to mixed precision alone?

    python -m profiling calibrate experiments/profiles/r3/english.json --model cache/r3 \\
        -o experiments/profiles/r3/english-calibrated-absorbed.json    # ~10 min on one core (96 plans)
    python -m profiling prune-curve experiments/profiles/r3/english-calibrated-absorbed.json --model cache/r3 \\
        -o experiments/profiles/r3/english-calibrated-curves.json      # ~17 min on one core (150 points)
    python -m experiments run r3_curves --out docs/results/r3_curves --resume       # ~70 min on one core
    python -m experiments report docs/results/r3_curves

Both profiles are calibrated on whole plans with single-candidate cells absorbed (``profiling calibrate``'s
default); ``english-calibrated-curves.json`` adds ``experiments.prune_curve``. The ILP solves from the curves
profile at every budget, and from the profile without curves where that one prunes (90 and 105 MB; from
110 MB on it keeps every expert and k = 12, the ``quantize_only`` plan of ``r3_calibrated``). The protocol
(first 4,096 tokens of the English test split, window 512, RTN in memory) is the ``r3_calibrated`` sweep's,
so its rows (mixed precision alone, refine, uniform formats) compare directly.
"""
from __future__ import annotations

from experiments.sweep import Sweep, grid, with_fields
from experiments.sweeps.r3 import BUDGETS, MODEL, TOKENS
from experiments.sweeps.r3_calibrated import BELOW_UNIFORM

PROFILE = "experiments/profiles/r3/english-calibrated-curves.json"
NO_CURVES = "experiments/profiles/r3/english-calibrated-absorbed.json"

_common = dict(model=MODEL, eval_tokens=TOKENS)
#: 80 and 85 MB: below 90 MB, where the ILP beat uniform int3 (94.7 MB) by a wide margin; 115 and 118 MB: below
#: 120 MB, where it beat uniform int5 (122.8 MB) by 9%
_budgets = tuple(sorted(BUDGETS + BELOW_UNIFORM + ("80MB", "85MB", "115MB", "118MB"), key=lambda b: int(b[:-2])))
SWEEP = Sweep(
    name="r3_curves",
    cells=tuple(grid(**_common, profile=PROFILE, budget=_budgets, method="ilp")
                + grid(**_common, profile=NO_CURVES, budget=("90MB", "105MB"), method="ilp")
                # the closed loop from the curves profile where the ILP alone does not beat uniform int3
                + grid(**_common, profile=PROFILE, budget=("70MB", "75MB", "80MB"), method="refine")
                # refine's baselines at the same budgets, so the report can tell whether it handed one over
                + grid(**_common, profile=PROFILE, budget=("70MB", "75MB", "80MB"), method=("greedy", "sequential"))),
    smoke=tuple(with_fields(grid(model=MODEL, profile=PROFILE, budget="110MB", method=("ilp",)), eval_tokens=512)),
    description="R3 (pretrained), calibrated format costs with and without measured prune curves: the joint ILP",
)
