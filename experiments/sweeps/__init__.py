"""The sweeps: each module defines ``SWEEP`` (see :mod:`experiments.sweep`); ``python -m experiments list``."""
