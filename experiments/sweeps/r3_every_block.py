"""R3 with every block quantizable: does the handed-over plan reach the CC-MoE paper's 0.74 bytes ratio once the
80-wide routed ``down_proj`` rows (a third of R3's BF16 bytes) have int candidates too?

    python -m profiling run --model cache/r3 --data english:calibration --max-tokens 1024 --prune-per-layer 4 \\
        --measure-blocks 96 --formats int2_g64 int3_g64 int4_g64 int5_g64 int6_g64 int8_g64 \\
        int2_g80 int3_g80 int4_g80 int5_g80 int6_g80 int8_g80 BF16 \\
        -o experiments/profiles/r3/every-block/english.json                      # ~70 min on one core
    python -m profiling calibrate experiments/profiles/r3/every-block/english.json --model cache/r3 --threads 2 \\
        -o experiments/profiles/r3/every-block/english-calibrated.json           # ~10 min on two cores
    python -m profiling prune-curve experiments/profiles/r3/every-block/english-calibrated.json --model cache/r3 \\
        --threads 2 -o experiments/profiles/r3/every-block/english-curves.json   # ~12 min on two cores
    python -m experiments run r3_every_block --out docs/results/r3_every_block --resume --workers 2  # ~45 min
    python -m experiments report docs/results/r3_every_block

No ``g64`` group divides a row of 80, so in the ``r3*`` sweeps R3's routed ``down_proj`` blocks (480 of them,
44.2 MB in BF16) stay BF16 in every plan, uniform ones included. Here the candidates
add the same bits in groups of 80 (one group per row; ``profiling run``'s default for such rows), and a uniform
plan ``uniform:int3_g64`` stores those rows in ``int3_g80`` (:func:`optimizer.formats.same_bits_stand_in`), so
uniform int3 is 59.9 MB instead of 94.7. The pipeline is ``r3_curves``' (calibrated on whole plans, measured
prune curves); the protocol is every R3 sweep's (first 4,096 tokens of the English test split, window 512, RTN
in memory, KL to the original model). Budgets from near uniform int2 (43.1 MB) to just above uniform int6
(110.3 MB); refine at about 0.7x the uniform int4 / int5 / int6 bytes, then (after a first run) the ILP where it
crossed the uniform plans and refine just below uniform int3 and int4. Results: README ("R3 with every block
quantizable"); the 0.74 bytes ratio is not reached (refine matches uniform int3 at 0.969 of its bytes).
"""
from __future__ import annotations

from experiments.sweep import Sweep, grid, with_fields
from experiments.sweeps.r3 import MODEL, TOKENS

PROFILE = "experiments/profiles/r3/every-block/english-curves.json"
FORMATS = ("int2_g64", "int3_g64", "int4_g64", "int5_g64", "int6_g64", "int8_g64")
BUDGETS = ("45MB", "50MB", "55MB", "60MB", "65MB", "70MB", "77MB", "85MB", "95MB", "110MB")
#: about 0.7x uniform int4 / int5 / int6 (76.7 / 93.5 / 110.3 MB)
HEADLINE = ("55MB", "65MB", "77MB")
#: added after the first run, where the ILP crossed the uniform plans: between 55 and 60 MB (int3), 70 and 77 (int4),
#: 85 and 95 (int5), 95 and 110 (int6)
CROSSINGS = ("58MB", "72MB", "74MB", "88MB", "90MB", "100MB", "105MB")

_common = dict(model=MODEL, profile=PROFILE, eval_tokens=TOKENS)
SWEEP = Sweep(
    name="r3_every_block",
    cells=tuple(grid(**_common, budget="1TB", method=tuple(f"uniform:{f}" for f in FORMATS))
                + grid(**_common, budget=BUDGETS, method="ilp")
                + grid(**_common, budget=BUDGETS[1::2], method="quantize_only")
                + grid(**_common, budget=HEADLINE, method=("greedy", "sequential", "refine"))
                + grid(**_common, budget=CROSSINGS, method="ilp")
                # refine just below uniform int3 / int4 (59.9 / 76.7 MB), where the ILP crossed them
                + grid(**_common, budget=("58MB", "72MB"), method="refine")),
    smoke=tuple(with_fields(grid(model=MODEL, profile=PROFILE, budget="70MB", method=("ilp",)), eval_tokens=512)),
    description="R3 (pretrained), every block quantizable (down_proj in g80): ILP, refine, baselines, uniform",
)
