"""The one small interface every solver implements, and the result a MILP backend returns.

Every solver, exact backend or heuristic baseline, is a :class:`Solver`: it has a name, declares what it
supports (whether it proves a bound, takes a warm start, which constraints it honours, whether it follows the
objective) and reports how it stopped as a :class:`Termination`. The MILP backends (:class:`SolverBackend`,
this package) minimise a :class:`~optimizer.milp.MilpModel`; the baselines (:class:`optimizer.baselines.Baseline`)
build a plan from the instance by fixed rules. Both are registered in :mod:`optimizer.solvers.registry`.

Backends import their solver library lazily (inside :meth:`SolverBackend.solve`) and map their own statuses onto
:class:`Termination`: how the *solver* stopped. The plan's own status (:class:`~optimizer.plan.SolveStatus`:
optimal within the requested gap or not) is derived from it, the objective and the bound by one function,
:func:`optimizer.solve.plan_status`, not by the solver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import numpy as np

from ..milp import MilpModel


class Termination(str, Enum):
    """How a solver stopped, the same for every backend and baseline."""

    OPTIMAL = "optimal"  # proven optimal within SolverOptions.rel_gap
    FEASIBLE = "feasible"  # a feasible point, optimality not proven (a time limit, or a heuristic)
    INFEASIBLE = "infeasible"  # no point meets the constraints (a heuristic: none under its own rules)
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


#: The constraints of a solve beyond the format choice itself, by the option that sets them
#: (:class:`optimizer.formulation.instance.FormulationOptions`).
CONSTRAINTS: tuple[str, ...] = ("budget", "target", "min_experts", "min_top_k", "min_tokens_per_s")


class Solver(ABC):
    """What every registered solver declares, exact MILP backend or heuristic baseline alike."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: True: reports a proven lower bound, so a plan can be certified optimal within a gap. False: a heuristic;
    #: its plans carry no bound and no gap, and its "infeasible" means "not under its own rules".
    proves_bound: ClassVar[bool] = True
    supports_warm_start: ClassVar[bool] = False
    #: The :data:`CONSTRAINTS` its plans are guaranteed to meet; a solve that sets another is refused with an
    #: :class:`~optimizer.errors.InputError` (:meth:`unhonoured`, :func:`optimizer.solve.optimize`).
    honours: ClassVar[frozenset[str]] = frozenset(CONSTRAINTS)
    #: Whether the plan depends on the objective (``--formulation``); False: a fixed recipe, the objective only
    #: prices its plan.
    follows_objective: ClassVar[bool] = True
    #: Whether dominated formats may be removed before it runs (an exact method loses nothing by it; a baseline
    #: reasons about every format).
    presolve: ClassVar[bool] = True

    @classmethod
    def available(cls) -> bool:
        """Whether it can run on this machine (a backend: whether its solver library imports)."""
        return True

    @classmethod
    def unhonoured(cls, requested: Iterable[str]) -> list[str]:
        """The requested :data:`CONSTRAINTS` this solver does not honour (a solve refuses them: InputError)."""
        return [c for c in requested if c not in cls.honours]


class SolverBackend(Solver):
    """A MILP solver. Subclasses set the class attributes and implement :meth:`available` and :meth:`solve`."""

    supports_continuous: ClassVar[bool] = True  # CP-SAT needs every variable integer

    @classmethod
    @abstractmethod
    def available(cls) -> bool:
        """Whether the solver library imports on this machine."""

    @abstractmethod
    def solve(self, model: MilpModel, options: SolverOptions, warm_start: np.ndarray | None = None) -> SolverResult:
        """Minimise ``model``; ``warm_start`` is a feasible point the backend may start from."""
