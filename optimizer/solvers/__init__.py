"""Solver backends behind one interface (see :mod:`optimizer.solvers.base`)."""
