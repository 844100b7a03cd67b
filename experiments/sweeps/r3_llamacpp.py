"""R3 in llama.cpp: ``--target llamacpp`` plans against llama-quantize with one type everywhere, each GGUF
exported by moecc and scored by llama.cpp itself (``llama-perplexity --kl-divergence`` against the original).

    python -m runtime llama-cpp build                                                  # once, ~20 min
    python -m profiling gguf-columns experiments/profiles/r3/english-calibrated-curves.json \\
        -o experiments/profiles/r3/english-gguf.json                                   # seconds
    python -m experiments run r3_llamacpp --out docs/results/r3_llamacpp --resume      # ~30 min on one core
    python -m experiments report docs/results/r3_llamacpp

The profile is R3's calibrated profile with measured prune curves (``r3_curves``) whose GGUF columns borrow the
costs of the int format with the same bits (Q4_0 <- int4_g64, ...: proxies, said so in the profile). Every
cell is exported with ``runtime export --to gguf`` (the GGUF's types and bytes checked against the plan) and
scored with ``runtime eval model.gguf --reference cache/r3`` on the first 8 windows of 512 tokens of the
English test split (llama-perplexity scores the second half of each window: 2,040 tokens). R3's routed
``down_proj`` rows are 80 long, which no GGUF block type divides: those blocks stay BF16 in every plan. The
uniform plans are 108.8 (Q4_0), 122.8 (Q5_0) and 164.9 MB (Q8_0); the ILP runs at those sizes and below.
"""
from __future__ import annotations

from experiments.sweep import Sweep, grid, with_fields

MODEL = "cache/r3"
PROFILE = "experiments/profiles/r3/english-gguf.json"
BUDGETS = ("95MB", "108MB", "122MB", "140MB", "164MB")
FORMATS = ("Q4_0", "Q5_0", "Q8_0")
TOKENS = 4096

_common = dict(model=MODEL, profile=PROFILE, eval_tokens=TOKENS, engine="llamacpp", window=512)
SWEEP = Sweep(
    name="r3_llamacpp",
    cells=tuple(grid(**_common, budget="1TB", method=tuple(f"uniform:{f}" for f in FORMATS))
                + grid(**_common, budget=BUDGETS, method="llamacpp")),
    smoke=tuple(with_fields(grid(**_common, budget="122MB", method="llamacpp"), eval_tokens=2048)),
    description="R3 in llama.cpp: the tied ILP's GGUFs against uniform GGUF types, KL measured by llama-perplexity",
)
