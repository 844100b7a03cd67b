"""Exceptions shared by every step. The CLIs turn :class:`InputError` into one line and exit code 2."""

from __future__ import annotations


class MoeccError(Exception):
    """Base class of the project's own errors."""


class InputError(MoeccError, ValueError):
    """Bad user input: a malformed file, a missing or unknown field, an impossible option.

    The message names the offending field (``profile.experts.frequency[3][17]: must be finite``).
    """


class InfeasibleError(MoeccError):
    """The constraints admit no plan (for example, the budget is below the smallest achievable size)."""

    def __init__(self, message: str, min_bytes: int | None = None):
        super().__init__(message)
        self.min_bytes = min_bytes


class SolverError(MoeccError):
    """A solver backend failed or is not installed."""


def error_line(exc: BaseException) -> str:
    """The exception's message on one line (a path or value with a newline must not split it)."""
    return " ".join(str(exc).split()) or type(exc).__name__
