"""``python -m optimizer.solvers.worker DIR``: the child process of :func:`optimizer.solvers.process.solve_in_child`.

Reads ``DIR/model.npz`` and ``DIR/spec.json``, runs the named backend in this process until the spec's
``stop_at`` (a ``time.time()`` instant), writes each improving solution the backend reports to
``DIR/incumbent.npy`` and the result to ``DIR/result.npy`` and ``DIR/result.json``. The parent kills this
process if it runs past the time limit.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from ..errors import MoeccError
from .base import SolverOptions
from .process import load_model, npy_bytes, write_atomically, write_error, write_result
from .registry import get_backend


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m optimizer.solvers.worker DIR", file=sys.stderr)
        return 2
    tmp = argv[0]
    with open(os.path.join(tmp, "spec.json")) as f:
        spec = json.load(f)
    model, warm_start = load_model(os.path.join(tmp, "model.npz"))
    incumbent = os.path.join(tmp, "incumbent.npy")

    def on_solution(x: np.ndarray) -> None:
        write_atomically(incumbent, npy_bytes(x))

    options = SolverOptions(time_limit=max(spec["stop_at"] - time.time(), 1e-3), rel_gap=spec["rel_gap"],
                            threads=spec["threads"], seed=spec["seed"], verbose=spec["verbose"], isolate=False,
                            on_solution=on_solution)
    try:
        result = get_backend(spec["backend"]).solve(model, options, warm_start=warm_start)
    except MoeccError as exc:
        write_error(tmp, str(exc))
        return 1
    write_result(tmp, result)
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a process by solve_in_child
    sys.exit(main(sys.argv[1:]))
