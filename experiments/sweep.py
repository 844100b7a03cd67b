"""Sweeps: a grid of cells over models x budgets x methods x formulations (x any other field).

A sweep is a Python module under ``experiments/sweeps/`` that defines ``SWEEP = Sweep(...)`` and says in its
docstring how to reproduce it and how long it takes; ``python -m experiments run NAME`` runs it. A
:class:`Cell` is one measurement: solve a plan for ``method`` at ``budget`` from ``profile``, compress
``model`` with it (in memory, or written by ``runtime apply`` when ``apply``), and evaluate it against the
original on held-out text (:func:`runtime.evaluate.evaluate` with ``reference``: KL divergence, top-1
agreement, perplexity). Its :meth:`Cell.key` (a hash of every field) names its result row, so a rerun skips
finished cells.

Methods (:data:`METHODS`; ``uniform:FORMAT``, ``prune_only:FORMAT`` and ``topk_only:FORMAT`` take a format):

==================  ======================================================================================
``ilp``             the joint ILP (HiGHS) under ``formulation``: pruning, per-layer top-k, mixed formats
``refine``          the plan :mod:`profiling.refine` hands over: the best measured on calibration text among
                    the ILP's rounds (corrected profile) and the baselines
``quantize_only``   the ILP with every expert kept and the original k: mixed precision alone
``prune_only:F``    the ILP with every block in format F (default BF16) and the original k: pruning alone
``topk_only:F``     the ILP with every block in format F (default BF16) and every expert kept: per-layer
                    top-k alone
``no_topk``         the ILP with the original k: pruning + mixed precision
``uniform:F``       one format F for every block, nothing pruned (``llama-quantize`` with one type)
``greedy``          the value-per-byte greedy baseline
``sequential``      the CC-MoE recipe (prune a fixed share, lower k, then formats)
``llamacpp``        the ILP with llama.cpp's ties (one format per layer and projection, one count, one k)
==================  ======================================================================================

``engine="llamacpp"`` evaluates the plan where llama.cpp users run it: ``runtime export --to gguf`` (the plan's
GGUF, checked against the plan) and ``runtime eval model.gguf --reference MODEL`` (``llama-perplexity
--kl-divergence``; the second half of each window is scored, so ``tokens`` is about half of ``eval_tokens``).
The plan must be one llama.cpp can store: GGUF types, one expert count and one k (``llamacpp``, ``uniform:Q4_0``...).
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable

from optimizer.errors import InputError

METHODS = ("ilp", "refine", "quantize_only", "prune_only", "topk_only", "no_topk", "uniform", "greedy", "sequential",
           "llamacpp")
FORMAT_METHODS = ("uniform", "prune_only", "topk_only")  # take ":FORMAT"
#: where a cell's plan is evaluated: moecc's runtime in PyTorch, or its GGUF in llama.cpp (runtime.gguf_eval)
ENGINES = ("moecc", "llamacpp")
#: fields added to :class:`Cell` after results were committed, with their defaults (left out of the key there)
LATER_FIELDS: dict[str, Any] = {"engine": "moecc"}
_UNSET = object()


@dataclass(frozen=True)
class Cell:
    """One measurement of a sweep; every field is part of its key and of its result row."""

    model: str  # checkpoint directory (the original, also the KL reference)
    profile: str  # profile.json the plan is solved from
    budget: str  # weights budget, e.g. "4MB" (no KV-cache or overhead reserve)
    method: str = "ilp"  # see the module docstring
    formulation: str = "predicted_loss"
    quantizer: str = "rtn"  # runtime quantizer: rtn | hqq (gptq needs `apply`)
    eval_corpus: str = "english"
    eval_split: str = "test"
    eval_tokens: int = 16384
    window: int | None = None  # default: the model's trained context (runtime.evaluate)
    apply: bool = False  # write with `runtime apply` and reload (checks bytes on disk); else compress in memory
    time_limit: float = 60.0
    engine: str = "moecc"  # moecc: PyTorch (runtime); llamacpp: the plan's GGUF scored in llama.cpp

    def __post_init__(self) -> None:
        base, _, fmt = self.method.partition(":")
        if base not in METHODS:
            raise InputError(f"cell.method: {self.method!r} is not one of {', '.join(METHODS)} "
                             f"({'/'.join(FORMAT_METHODS)} take :FORMAT)")
        if fmt and base not in FORMAT_METHODS:
            raise InputError(f"cell.method: {base} takes no format, got {self.method!r}")
        if base == "uniform" and not fmt:
            raise InputError("cell.method: uniform needs a format, e.g. uniform:int4_g32")
        if self.eval_tokens < 1:
            raise InputError(f"cell.eval_tokens: must be positive, got {self.eval_tokens}")
        if self.engine not in ENGINES:
            raise InputError(f"cell.engine: {self.engine!r} is not one of {', '.join(ENGINES)}")
        if self.engine == "llamacpp" and (self.apply or self.quantizer != "rtn"):
            raise InputError("cell.engine llamacpp: llama-quantize quantizes the GGUF; apply and quantizer do not "
                             "apply")

    @property
    def base_method(self) -> str:
        return self.method.partition(":")[0]

    @property
    def method_format(self) -> str | None:
        return self.method.partition(":")[2] or None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def key(self) -> str:
        """sha256 (16 hex digits) of the cell's fields: the identity of its result row. Fields added after
        results existed (:data:`LATER_FIELDS`) count only away from their default, so old rows keep their key."""
        doc = {k: v for k, v in self.to_json().items() if LATER_FIELDS.get(k, _UNSET) != v}
        text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


CELL_FIELDS = tuple(f.name for f in fields(Cell))


def grid(**axes: Iterable[Any] | Any) -> list[Cell]:
    """Every combination of the axes (an axis given as a single value is fixed), in axis order."""
    unknown = sorted(set(axes) - set(CELL_FIELDS))
    if unknown:
        raise InputError(f"sweep grid: unknown cell field {unknown[0]!r} (fields: {', '.join(CELL_FIELDS)})")
    names = list(axes)
    values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in axes.values()]
    return [Cell(**dict(zip(names, combo))) for combo in itertools.product(*values)]


@dataclass(frozen=True)
class Sweep:
    """A named list of cells; ``smoke`` is the quick subset that ``--smoke`` (and CI) runs."""

    name: str
    cells: tuple[Cell, ...]
    smoke: tuple[Cell, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        keys = [c.key() for c in self.cells]
        if len(set(keys)) != len(keys):
            raise InputError(f"sweep {self.name}: the same cell appears twice")

    def selected(self, smoke: bool) -> tuple[Cell, ...]:
        return self.smoke if smoke else self.cells


def with_fields(cells: Iterable[Cell], **changes: Any) -> list[Cell]:
    """The cells with some fields replaced (e.g. fewer eval tokens for a smoke subset)."""
    return [replace(c, **changes) for c in cells]
