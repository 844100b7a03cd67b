"""R3 (SmolLM2-135M turned into a 16-expert Qwen2-MoE, 270 MB in BF16): the handed-over plan against the
baselines at five budgets, on pretrained weights.

    python -m experiments.reference_models.r3_moefy build --out cache/r3     # once, ~10-30 min
    python -m experiments run r3 --resume      # ~50 min on one busy core
    python -m experiments report experiments/results/r3

Budgets from 90 MB (below uniform int3, 94.7 MB) to ~60% of the BF16 bytes (160 MB); KL to the original and
perplexity on the first 4,096 tokens of the English test split (window 512). Fewer methods and tokens than
R1/R2: each cell runs two 135M-parameter models over the test text, and refine measures ~15 plans on 4,096
calibration tokens (~8 min a budget). A first run at 60 MB gave KL 12.3 (refine) and 15.6 (ILP) nats/token:
the model is destroyed there, so that budget was dropped.
"""
from __future__ import annotations

from experiments.sweep import Sweep, grid, with_fields

MODEL = "cache/r3"
PROFILE = "experiments/profiles/r3/english.json"
BUDGETS = ("90MB", "110MB", "130MB", "160MB")
FORMATS = ("int3_g64", "int4_g64", "int5_g64", "int6_g64", "int8_g64")
TOKENS = 4096

_common = dict(model=MODEL, profile=PROFILE, eval_tokens=TOKENS)
SWEEP = Sweep(
    name="r3",
    cells=tuple(grid(**_common, budget=BUDGETS, method=("refine", "ilp", "quantize_only", "greedy", "sequential"))
                + grid(**_common, budget="1TB", method=tuple(f"uniform:{f}" for f in FORMATS))),
    smoke=tuple(with_fields(grid(model=MODEL, profile=PROFILE, budget="110MB", method=("ilp", "quantize_only")),
                            eval_tokens=512)),
    description="R3 (pretrained): refine, ILP, ablation, baselines, uniform formats",
)
