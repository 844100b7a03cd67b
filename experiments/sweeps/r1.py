"""R1 (DeepSeek-V3 architecture, 10M parameters, 20.2 MB in BF16): every method at five budgets.

    python -m experiments run r1 --resume      # ~35 min on 2 cores (2 workers); --smoke: ~1 min
    python -m experiments report experiments/results/r1

Budgets from the smallest the joint ILP fits (3 MB) to ~60% of the BF16 bytes (12 MB); KL to the original
and perplexity on the first 16,384 tokens of the English test split (window 256, the trained context);
calibration shift: plans from the English and the code profile, evaluated on English and on code.
"""
from __future__ import annotations

from experiments.sweep import Sweep, grid, with_fields
from experiments.sweeps._common import method_cells, shift_cells

MODEL = "models/r1-deepseek-v3-tiny"
PROFILE = "experiments/profiles/r1/english.json"
BUDGETS = ("3MB", "4MB", "6MB", "8MB", "12MB")
FORMATS = ("int2_g64", "int3_g64", "int4_g64", "int5_g64", "int6_g64", "int8_g64")
TOKENS = 16384

_cells = method_cells(MODEL, PROFILE, BUDGETS, FORMATS, TOKENS)
_shift = [c for c in shift_cells(MODEL, {"english": PROFILE, "code": "experiments/profiles/r1/code.json"},
                                 BUDGETS, ("english", "code"), TOKENS) if c not in _cells]
SWEEP = Sweep(
    name="r1", cells=tuple(_cells + _shift),
    smoke=tuple(with_fields(grid(model=MODEL, profile=PROFILE, budget="4MB",
                                 method=("ilp", "quantize_only", "greedy")), eval_tokens=512)
                + with_fields(grid(model=MODEL, profile=PROFILE, budget="1TB", method="uniform:int4_g64"),
                              eval_tokens=512)),
    description="R1: formulations, ablations, baselines, uniform formats, calibration shift",
)
