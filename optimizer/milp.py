"""A solver-agnostic mixed-integer linear program in matrix form, and a builder for it.

    minimise    c^T x + offset
    subject to  row_lower <= A x <= row_upper
                col_lower <=   x <= col_upper
                x_j integer for every j with integer[j]

Variables and rows are added in named families (``keep``, ``format``, ``budget``...) so that results can be
read back by name and errors can say which constraint family is at fault. Nothing here imports a solver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

INF = float("inf")


@dataclass(frozen=True, eq=False)
class MilpModel:
    c: np.ndarray
    offset: float
    A: sp.csr_matrix
    row_lower: np.ndarray
    row_upper: np.ndarray
    col_lower: np.ndarray
    col_upper: np.ndarray
    integer: np.ndarray
    col_families: dict[str, np.ndarray] = field(default_factory=dict)
    row_families: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_vars(self) -> int:
        return int(self.c.shape[0])

    @property
    def num_rows(self) -> int:
        return int(self.A.shape[0])

    def objective_value(self, x: np.ndarray) -> float:
        return float(self.c @ x + self.offset)

    def violation(self, x: np.ndarray) -> float:
        """Largest violation of any row, bound or integrality by ``x`` (0 for a feasible point)."""
        ax = self.A @ x
        worst = max(
            float(np.max(self.row_lower - ax, initial=0.0)), float(np.max(ax - self.row_upper, initial=0.0)),
            float(np.max(self.col_lower - x, initial=0.0)), float(np.max(x - self.col_upper, initial=0.0)),
        )
        xi = x[self.integer]
        return max(worst, float(np.max(np.abs(xi - np.round(xi)), initial=0.0)))

    def violated_families(self, x: np.ndarray, tol: float = 1e-6) -> list[str]:
        """Names of the row families that ``x`` violates (for error messages and tests)."""
        ax = self.A @ x
        bad = (ax < self.row_lower - tol) | (ax > self.row_upper + tol)
        return [name for name, rows in self.row_families.items() if bad[rows].any()]


class MilpBuilder:
    """Accumulates variable families and sparse rows (COO triplets), then freezes into a :class:`MilpModel`."""

    def __init__(self) -> None:
        self._n = 0
        self._lb: list[np.ndarray] = []
        self._ub: list[np.ndarray] = []
        self._int: list[np.ndarray] = []
        self._c: list[np.ndarray] = []
        self.offset = 0.0
        self._rows_i: list[np.ndarray] = []
        self._rows_j: list[np.ndarray] = []
        self._rows_v: list[np.ndarray] = []
        self._rlo: list[np.ndarray] = []
        self._rhi: list[np.ndarray] = []
        self._m = 0
        self.col_families: dict[str, np.ndarray] = {}
        self.row_families: dict[str, np.ndarray] = {}

    @property
    def num_vars(self) -> int:
        return self._n

    def add_vars(self, name: str, count: int, lower: float | np.ndarray = 0.0, upper: float | np.ndarray = 1.0,
                 integer: bool = True, cost: float | np.ndarray = 0.0) -> np.ndarray:
        """Add ``count`` variables; return their column indices."""
        if name in self.col_families:
            raise ValueError(f"variable family {name!r} added twice")
        idx = np.arange(self._n, self._n + count)
        self._n += count
        self._lb.append(np.broadcast_to(np.asarray(lower, float), (count,)).copy())
        self._ub.append(np.broadcast_to(np.asarray(upper, float), (count,)).copy())
        self._int.append(np.full(count, integer))
        self._c.append(np.broadcast_to(np.asarray(cost, float), (count,)).copy())
        self.col_families[name] = idx
        return idx

    def add_cost(self, cols: np.ndarray, cost: np.ndarray | float) -> None:
        """Add ``cost`` to the objective coefficients of ``cols`` (accumulates)."""
        c = np.concatenate(self._c) if self._c else np.zeros(0)
        np.add.at(c, np.asarray(cols), np.broadcast_to(np.asarray(cost, float), np.shape(cols)))
        self._c = [c]

    def add_rows(self, name: str, row: np.ndarray, col: np.ndarray, val: np.ndarray | float,
                 lower: np.ndarray | float, upper: np.ndarray | float, count: int | None = None) -> np.ndarray:
        """Add rows given in local COO form: ``row`` counts from 0 within this family. Returns row indices."""
        row = np.asarray(row, dtype=np.int64)
        col = np.asarray(col, dtype=np.int64)
        nrows = int(row.max()) + 1 if count is None else count
        if row.size and (row.min() < 0 or row.max() >= nrows):
            raise ValueError(f"row family {name!r}: local row index out of range")
        self._rows_i.append(row + self._m)
        self._rows_j.append(col)
        self._rows_v.append(np.broadcast_to(np.asarray(val, float), row.shape).copy())
        self._rlo.append(np.broadcast_to(np.asarray(lower, float), (nrows,)).copy())
        self._rhi.append(np.broadcast_to(np.asarray(upper, float), (nrows,)).copy())
        idx = np.arange(self._m, self._m + nrows)
        self._m += nrows
        key = name
        suffix = 2
        while key in self.row_families:
            key = f"{name}#{suffix}"
            suffix += 1
        self.row_families[key] = idx
        return idx

    def build(self) -> MilpModel:
        cat = lambda parts, dtype=float: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
        A = sp.coo_matrix(
            (cat(self._rows_v), (cat(self._rows_i, np.int64), cat(self._rows_j, np.int64))), shape=(self._m, self._n)
        ).tocsr()
        A.sum_duplicates()
        return MilpModel(
            c=cat(self._c), offset=float(self.offset), A=A, row_lower=cat(self._rlo), row_upper=cat(self._rhi),
            col_lower=cat(self._lb), col_upper=cat(self._ub), integer=cat(self._int, bool),
            col_families=dict(self.col_families), row_families=dict(self.row_families),
        )
