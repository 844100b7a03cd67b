"""R2 through the pipeline R3 and R4 use: calibrated on whole plans, measured prune curves, and the objective
mapped to KL; the plan ``refine`` hands over, the joint ILP and mixed precision alone against uniform formats.

    python -m profiling calibrate experiments/profiles/r2/english.json --model models/r2-qwen3-moe-tiny \\
        -o experiments/profiles/r2/english-calibrated.json                      # ~1 min on one core
    python -m profiling prune-curve experiments/profiles/r2/english-calibrated.json \\
        --model models/r2-qwen3-moe-tiny -o experiments/profiles/r2/english-calibrated-curves.json   # ~30 s
    python -m profiling fit-prediction experiments/profiles/r2/english-calibrated-curves.json \\
        --model models/r2-qwen3-moe-tiny -o experiments/profiles/r2/english-predicted.json           # ~40 s
    python -m experiments run r2_curves --out docs/results/r2_curves --resume --workers 1   # ~4 min
    python -m experiments report docs/results/r2_curves

Same budgets, formats and protocol as ``r2`` (first 16,384 tokens of the English test split, window 256, RTN
in memory), so its rows from the single-effect profile compare directly.
"""
from __future__ import annotations

from experiments.sweeps._common import curves_sweep
from experiments.sweeps.r2 import BUDGETS, FORMATS, MODEL, TOKENS

PROFILE = "experiments/profiles/r2/english-predicted.json"
SWEEP = curves_sweep("r2_curves", "R2", MODEL, PROFILE, BUDGETS, FORMATS, TOKENS, smoke_budget="3MB")
