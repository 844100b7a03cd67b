"""Memory budgets: parsing ``128GB`` / ``120GiB`` and the reserves taken off before weights are placed.

    available for weights = budget - kv_cache(context) - overhead

KV cache bytes come from the architecture (:class:`~optimizer.model_spec.KVCacheSpec`: MLA's compressed
latent for DeepSeek, ``2 * kv_heads * head_dim`` for grouped-query attention) at ``dtype_bytes`` per element.
Sizes are bounded by :data:`MAX_BYTES` and the context by :data:`MAX_CONTEXT` (``docs/optimizer.md``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import InputError
from .model_spec import Architecture

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

DEFAULT_CONTEXT = 8192
DEFAULT_OVERHEAD = "2GiB"
#: Largest budget, overhead or plan byte count: 1 EiB (2**60 bytes). Byte counts stay exact int64 values,
#: far below the 1e20 that HiGHS reads as infinite.
MAX_BYTES = 2**60
#: Most tokens of KV cache ``--context`` may reserve (2**31 - 1).
MAX_CONTEXT = 2**31 - 1


def parse_bytes(text: str | float, what: str = "size", minimum: int = 1) -> int:
    """``"128GB"`` -> 128e9, ``"120GiB"`` -> 120 * 2**30, ``"5e9"`` -> 5e9. Decimal GB and binary GiB both work.

    The result lies in ``[minimum, MAX_BYTES]``; anything else (``1e400GB``, ``nan``) is an :class:`InputError`.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise InputError(f"{what}: expected a size such as 128GB, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = text, ""
    else:
        m = _SIZE_RE.match(text)
        if not m:
            raise InputError(f"{what}: cannot read {text[:40]!r} as a size (examples: 128GB, 120GiB, 512MB)")
        digits, unit = m.group(1), m.group(2).lower()
        value = int(digits) if digits.isdigit() and len(digits) <= 30 else float(digits)  # "5000000001B" exact
    if unit not in _UNITS:
        raise InputError(f"{what}: unknown unit {unit!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")
    if isinstance(value, float) and math.isnan(value):
        raise InputError(f"{what}: expected a size, got {text!r}")
    if value * _UNITS[unit] > MAX_BYTES:  # also catches 1e400 (inf); ints are compared exactly
        raise InputError(f"{what}: {str(text)[:40]} is more than the limit of {MAX_BYTES} bytes (2**60, 1 EiB)")
    out = round(value * _UNITS[unit])  # an int, exact for integer input
    if out < minimum:
        raise InputError(f"{what}: must be {'positive' if minimum == 1 else f'>= {minimum} bytes'}, got {text!r}")
    return out


def format_bytes(n: float) -> str:
    """Human-readable decimal size: ``127.4 GB``."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Budget:
    """A total memory budget and what is reserved out of it; ``available`` is left for the weights."""

    total: int
    reserves: dict[str, int]

    @property
    def available(self) -> int:
        return self.total - sum(self.reserves.values())


def make_budget(arch: Architecture, budget: str | int, context: int = DEFAULT_CONTEXT,
                overhead: str | int = DEFAULT_OVERHEAD) -> Budget:
    """Budget minus the KV cache of ``context`` tokens and a fixed runtime overhead."""
    total = parse_bytes(budget, "--budget")
    if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context <= MAX_CONTEXT:
        raise InputError(f"--context: expected a number of tokens in [0, {MAX_CONTEXT}], got {context!r}")
    over = parse_bytes(overhead, "--overhead", minimum=0)
    reserves = {"kv_cache": arch.kv_cache.bytes_for(context), "overhead": over}
    out = Budget(total, reserves)
    if out.available <= 0:
        raise InputError(
            f"--budget: {format_bytes(total)} leaves nothing for weights after reserves "
            f"(KV cache {format_bytes(reserves['kv_cache'])} for {context} tokens, overhead {format_bytes(over)})"
        )
    return out
