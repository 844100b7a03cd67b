"""R1 (DeepSeek-V3 architecture, 10M parameters): the runtime's quantizers, RTN, HQQ and GPTQ, at 2, 3, 4 bits.

    python -m experiments run quantizers_r1 --out docs/results/quantizers_r1 --workers 1  # ~4 min; --smoke ~40 s
    python -m experiments report docs/results/quantizers_r1

One uniform plan per format (``uniform:int{2,3,4}_g64``: every quantizable block in that format, embeddings
included, nothing pruned, top-k unchanged), written by each quantizer (``runtime apply --method``). RTN and
HQQ are applied in memory (equal to ``runtime apply`` + ``runtime.load``, tested); GPTQ needs calibration
input, so its cells are written by ``runtime apply --method gptq`` (sequential Hessians from the first 2,048
tokens of the English calibration split; blocks without a linear input, the embeddings, by RTN) and reloaded.
Protocol as ``r1``'s: KL to the original and perplexity on the first 16,384 tokens of the English test split,
window 256 (the trained context); the RTN cells are the same cells as ``r1``'s uniform ones.
"""
from __future__ import annotations

from experiments.sweep import Sweep, grid, with_fields
from experiments.sweeps._common import UNIFORM_BUDGET

MODEL = "models/r1-deepseek-v3-tiny"
PROFILE = "experiments/profiles/r1/english.json"
FORMATS = ("int2_g64", "int3_g64", "int4_g64")
TOKENS = 16384

_common = dict(model=MODEL, profile=PROFILE, budget=UNIFORM_BUDGET, eval_tokens=TOKENS)
_methods = tuple(f"uniform:{f}" for f in FORMATS)
_cells = (grid(**_common, method=_methods, quantizer=("rtn", "hqq"))
          + grid(**_common, method=_methods, quantizer="gptq", apply=True))
SWEEP = Sweep(
    name="quantizers_r1",
    cells=tuple(_cells),
    smoke=tuple(with_fields([c for c in _cells if c.method == "uniform:int4_g64"], eval_tokens=512)),
    description="R1: RTN, HQQ and GPTQ at 2, 3, 4 bits (uniform formats, nothing pruned)",
)
