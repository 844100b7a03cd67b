"""Backends by name. Importing this module imports no solver library; each backend does so inside ``solve``."""

from __future__ import annotations

from ..errors import SolverError
from .base import SolverBackend
from .cbc import CbcBackend
from .cpsat import CpSatBackend
from .highs import HighsBackend

DEFAULT_BACKEND = "highs"

BACKENDS: dict[str, type[SolverBackend]] = {
    HighsBackend.name: HighsBackend,
    CbcBackend.name: CbcBackend,
    CpSatBackend.name: CpSatBackend,
}

_INSTALL = {
    "highs": "pip install highspy",
    "cbc": "pip install pulp (it bundles CBC), or put a 'cbc' executable on PATH",
    "cpsat": "pip install ortools",
}


def available_backends() -> list[str]:
    """Names of the backends whose solver library is installed, default first."""
    return [name for name, cls in BACKENDS.items() if cls.available()]


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
