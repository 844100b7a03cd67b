"""R2 (Qwen3-MoE architecture, 7.5M parameters, 15.1 MB in BF16): every method at five budgets.

    python -m experiments run r2 --resume      # ~40 min on 2 cores; --smoke: ~1 min
    python -m experiments report experiments/results/r2

Budgets from 2 MB (below uniform int2, 2.5 MB) to ~60% of the BF16 bytes (9 MB); KL to the original and
perplexity on the first 16,384 tokens of the English test split (window 256, the trained context).
"""
from __future__ import annotations

from experiments.sweep import Sweep, grid, with_fields
from experiments.sweeps._common import method_cells

MODEL = "models/r2-qwen3-moe-tiny"
PROFILE = "experiments/profiles/r2/english.json"
BUDGETS = ("2MB", "3MB", "4MB", "6MB", "9MB")
FORMATS = ("int2_g64", "int3_g64", "int4_g64", "int5_g64", "int6_g64", "int8_g64")
TOKENS = 16384

SWEEP = Sweep(
    name="r2", cells=tuple(method_cells(MODEL, PROFILE, BUDGETS, FORMATS, TOKENS)),
    smoke=tuple(with_fields(grid(model=MODEL, profile=PROFILE, budget="3MB", method=("ilp", "quantize_only")),
                            eval_tokens=512)),
    description="R2: formulations, ablations, baselines, uniform formats",
)
