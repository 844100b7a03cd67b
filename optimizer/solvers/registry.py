"""Every solver by name: the MILP backends and the baselines, behind one interface (:class:`~.base.Solver`).

Importing this module imports no solver library; each backend does so inside ``solve``.
"""

from __future__ import annotations

from ..baselines import BASELINE_CLASSES
from ..errors import SolverError
from .base import Solver, SolverBackend
from .cbc import CbcBackend
from .cpsat import CpSatBackend
from .highs import HighsBackend

DEFAULT_BACKEND = "highs"

BACKENDS: dict[str, type[SolverBackend]] = {
    HighsBackend.name: HighsBackend,
    CbcBackend.name: CbcBackend,
    CpSatBackend.name: CpSatBackend,
}

#: The one registry: backends first, then the baselines (heuristics: ``proves_bound`` is False).
SOLVERS: dict[str, type[Solver]] = {**BACKENDS, **BASELINE_CLASSES}

_INSTALL = {
    "highs": "pip install highspy",
    "cbc": "pip install pulp (it bundles CBC), or put a 'cbc' executable on PATH",
    "cpsat": "pip install ortools",
}


def solver_names() -> list[str]:
    """Every registered name: the backends in alphabetical order, then the baselines (the CLI's ``--solver``)."""
    return sorted(BACKENDS) + list(BASELINE_CLASSES)


def available_backends() -> list[str]:
    """Names of the backends whose solver library is installed, default first."""
    return [name for name, cls in BACKENDS.items() if cls.available()]


def get_solver(name: str) -> Solver:
    """A ready solver, backend or baseline; :class:`SolverError` for an unknown name or a backend that is not
    installed."""
    if name in BASELINE_CLASSES:
        return BASELINE_CLASSES[name]()
    if name.strip().lower() not in BACKENDS:
        raise SolverError(f"unknown solver {name!r}; available: {', '.join(SOLVERS)}")
    return get_backend(name)


def get_backend(name: str = DEFAULT_BACKEND) -> SolverBackend:
    """A ready backend; :class:`SolverError` for an unknown name or a solver that is not installed."""
    key = name.strip().lower()
    if key not in BACKENDS:
        raise SolverError(f"unknown solver {name!r}; available: {', '.join(BACKENDS)}")
    cls = BACKENDS[key]
    if not cls.available():
        installed = available_backends()
        raise SolverError(f"solver {key!r} is not installed ({_INSTALL.get(key, 'see docs')}); "
                          f"installed: {', '.join(installed) if installed else 'none'}")
    return cls()
