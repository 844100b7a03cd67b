"""R3 with format costs calibrated on whole plans (``profiling calibrate``): the ILP's own plans against uniform.

    python -m profiling calibrate experiments/profiles/r3/english.json --model cache/r3 --keep-fixed-cells \\
        -o experiments/profiles/r3/english-calibrated.json          # ~20 min on one core (112 plans measured)
    python -m experiments run r3_calibrated --out docs/results/r3_calibrated --resume   # ~80 min on one core
    python -m experiments report docs/results/r3_calibrated

The same budgets, evaluation protocol (first 4,096 tokens of the English test split, window 512) and uniform
formats as the ``r3`` sweep, whose profile has single-block format costs; here every cell solves from the
calibrated profile. Cheap cells first (ILP, mixed precision alone, uniform), refine last (~8 min a budget);
then mixed precision alone and refine just below each uniform format, for the headline ratio.
The greedy and sequential baselines of the ``r3`` report are the comparison for those methods.
"""
from __future__ import annotations

from experiments.sweep import Sweep, grid, with_fields
from experiments.sweeps.r3 import BUDGETS, FORMATS, MODEL, TOKENS

PROFILE = "experiments/profiles/r3/english-calibrated.json"
#: just below uniform int4 / int5 / int6 (108.8 / 122.8 / 136.8 MB): where the headline ratio is decided
BELOW_UNIFORM = ("105MB", "120MB", "132MB")

_common = dict(model=MODEL, profile=PROFILE, eval_tokens=TOKENS)
SWEEP = Sweep(
    name="r3_calibrated",
    cells=tuple(grid(**_common, budget=BUDGETS, method=("ilp", "quantize_only"))
                + grid(**_common, budget="1TB", method=tuple(f"uniform:{f}" for f in FORMATS))
                + grid(**_common, budget=BUDGETS, method="refine")
                + grid(**_common, budget=BELOW_UNIFORM, method=("quantize_only", "refine"))),
    smoke=tuple(with_fields(grid(model=MODEL, profile=PROFILE, budget="110MB", method=("quantize_only",)),
                            eval_tokens=512)),
    description="R3 (pretrained), calibrated format costs: ILP, mixed precision alone, refine, uniform formats",
)
