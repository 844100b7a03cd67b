"""The CI sweep: four cells on R1 with 512 evaluation tokens (~1 min on 2 cores).

    python -m experiments run smoke --out /tmp/smoke
"""
from __future__ import annotations

from experiments.sweep import Sweep
from experiments.sweeps.r1 import SWEEP as R1

SWEEP = Sweep(name="smoke", cells=R1.smoke, smoke=R1.smoke, description="R1 smoke subset (CI)")
