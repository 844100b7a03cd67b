"""The one small interface every solver backend implements, and the result it returns.

Backends import their solver library lazily (inside :meth:`SolverBackend.solve`), declare what they
support, and map their own statuses onto :class:`Termination`: how the *solver* stopped. The plan's own status
(:class:`~optimizer.plan.Termination`: optimal within the requested gap or not) is decided by
:mod:`optimizer.solve` from the returned objective and bound, not by the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from ..milp import MilpModel


class Termination(str, Enum):
    """How a backend stopped, the same for every backend."""

    OPTIMAL = "optimal"  # proven optimal within SolverOptions.rel_gap
    FEASIBLE = "feasible"  # a feasible point, optimality not proven (time limit)
    INFEASIBLE = "infeasible"
    NO_SOLUTION = "no_solution"  # stopped (time limit) before any feasible point
    ERROR = "error"

    @property
    def has_solution(self) -> bool:
        return self in (Termination.OPTIMAL, Termination.FEASIBLE)


@dataclass(frozen=True)
class SolverOptions:
    time_limit: float | None = None  # seconds for the whole call, loading the model included; None = no limit
    rel_gap: float = 1e-4  # stop when (objective - bound) / |objective| <= rel_gap
    threads: int = 1  # 1 keeps runs deterministic
    seed: int = 0
    verbose: bool = False
    # HiGHS, CP-SAT: run in a child process that is killed at the time limit (optimizer.solvers.process); None:
    # large models under a time limit do, others run in this process. CBC always runs as a process of its own.
    isolate: bool | None = None
    on_solution: Callable[[np.ndarray], None] | None = None  # told each improving solution (where supported)


@dataclass(frozen=True, eq=False)
class SolverResult:
    status: Termination
    x: np.ndarray | None
    objective: float | None  # c^T x + offset of the returned point
    bound: float | None  # proven lower bound on the optimum
    seconds: float
    message: str = ""

    @property
    def gap(self) -> float | None:
        return relative_gap(self.objective, self.bound)


def relative_gap(objective: float | None, bound: float | None) -> float | None:
    """(objective - bound) / max(|objective|, 1e-12), clipped at 0; None when either is unknown."""
    if objective is None or bound is None:
        return None
    return max(0.0, (objective - bound) / max(abs(objective), 1e-12))


class SolverBackend(ABC):
    """A MILP solver. Subclasses set the class attributes and implement :meth:`solve`."""

    name: str = ""
    description: str = ""
    supports_continuous: bool = True  # CP-SAT needs every variable integer
    supports_warm_start: bool = False

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """Whether the solver library imports on this machine."""

    @abstractmethod
    def solve(self, model: MilpModel, options: SolverOptions, warm_start: np.ndarray | None = None) -> SolverResult:
        """Minimise ``model``; ``warm_start`` is a feasible point the backend may start from."""
