"""R4 (SmolLM2-135M turned into a 32-expert, top-8 Qwen2-MoE with sharp distilled routers, 271 MB in BF16):
the handed-over plan against every simpler strategy at five budgets, on pretrained weights with sparse routing.

    python -m experiments.reference_models.r4_moefy build --out cache/r4              # once, ~31 min
    python -m profiling run --model cache/r4 --data english:calibration --max-tokens 1024 --prune-per-layer 4 \\
        --measure-blocks 96 --formats int2_g64 int3_g64 int4_g64 int5_g64 int6_g64 int8_g64 BF16 \\
        -o experiments/profiles/r4/english.json                                         # ~25 min
    python -m profiling calibrate experiments/profiles/r4/english.json --model cache/r4 \\
        -o experiments/profiles/r4/english-calibrated.json                              # ~10 min
    python -m profiling prune-curve experiments/profiles/r4/english-calibrated.json --model cache/r4 \\
        -o experiments/profiles/r4/english-calibrated-curves.json                       # ~15 min
    python -m profiling fit-prediction experiments/profiles/r4/english-calibrated-curves.json --model cache/r4 \\
        -o experiments/profiles/r4/english-predicted.json                               # ~7 min
    python -m experiments run r4 --out docs/results/r4 --resume --workers 2             # ~100 min on two cores
    python -m experiments report docs/results/r4

The ILP and refine rows were measured after the prune-curve count term was changed to interpolate the
measured cost (commit "Prune-curve count term interpolates the measured cost"); the baselines' plans do not
depend on it. The profile is calibrated on whole plans and carries measured prune curves (the R3 pipeline,
``r3_curves``), and maps its objective to KL (``fit-prediction``), so every ILP row has a predicted KL
beside the measured one. Budgets from 85 MB (uniform int2, the smallest uniform plan, is 81.8 MB) to 160 MB
(59% of the BF16 bytes). R4's routed ``down_proj`` blocks are 40 wide, which no ``g64`` format stores: they stay
BF16 (44 MB) in every plan, uniform ones included. Protocol as R3's: the first 4,096 tokens of the English
test split, window 512, RTN in memory, KL to the original model.
"""
from __future__ import annotations

from experiments.sweep import Sweep, grid, with_fields

MODEL = "cache/r4"
PROFILE = "experiments/profiles/r4/english-predicted.json"
BUDGETS = ("85MB", "100MB", "115MB", "130MB", "160MB")
BELOW = ("70MB", "75MB")
FORMATS = ("int2_g64", "int3_g64", "int4_g64", "int5_g64", "int6_g64", "int8_g64")
TOKENS = 4096

_common = dict(model=MODEL, profile=PROFILE, eval_tokens=TOKENS)
SWEEP = Sweep(
    name="r4",
    cells=tuple(grid(**_common, budget="1TB", method=tuple(f"uniform:{f}" for f in FORMATS))
                + grid(**_common, budget=BUDGETS, method=("ilp", "quantize_only", "greedy", "sequential",
                                                          "prune_only:BF16"))
                + grid(**_common, budget=BUDGETS, method="refine")
                # below uniform int2 (81.8 MB): how far under uniform int3 (95.8 MB) the handed-over plan holds
                + grid(**_common, budget=BELOW, method=("refine", "ilp"))),
    smoke=tuple(with_fields(grid(model=MODEL, profile=PROFILE, budget="115MB", method=("ilp",)), eval_tokens=512)),
    description="R4 (pretrained, 32 experts top-8, sharp routers): refine, ILP, ablations, baselines, uniform formats",
)
