"""Strict reading of the JSON contracts: every error names the field it is about.

:class:`Reader` wraps one JSON object at a path (``profile.experts``). Taking a field removes it from the
set of unseen keys; :meth:`Reader.done` rejects what is left, so unknown keys never pass silently.
Files may be gzip-compressed (``.json.gz``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .errors import InputError


def read_json(path: str | os.PathLike) -> tuple[Any, str]:
    """Read a (possibly gzipped) JSON file; return the document and the sha256 of its canonical form."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected a JSON file")
    raw = p.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(f"{p}: broken gzip stream ({exc})") from None
    non_finite: list[str] = []

    def constant(text: str) -> float:  # NaN, Infinity, -Infinity
        non_finite.append(text)
        return float(text)

    def parse_float(text: str) -> float:  # 1e999 overflows to inf
        value = float(text)
        if not math.isfinite(value):
            non_finite.append(text)
        return value

    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=constant, parse_float=parse_float)
    except UnicodeDecodeError:
        raise InputError(f"{p}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{p}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    if non_finite:
        where = _first_non_finite(doc, "") or "(a duplicated key)"
        raise InputError(f"{p}: {where}: {non_finite[0]} is not a finite number (JSON has no NaN or Infinity)")
    return doc, canonical_hash(doc)


def _first_non_finite(value: Any, path: str) -> str | None:
    """JSON path of the first non-finite float in ``value`` (only walked when the parser saw one)."""
    if isinstance(value, float) and not math.isfinite(value):
        return path or "(top level)"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _first_non_finite(item, f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key))
        if found:
            return found
    return None


def canonical_hash(doc: Any) -> str:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def write_json(path: str | os.PathLike, doc: Any, indent: int | None = 1) -> None:
    """Write atomically (temp file + rename); ``.gz`` paths are gzip-compressed deterministically."""
    p = Path(path)
    text = json.dumps(doc, indent=indent, sort_keys=False, allow_nan=False) + "\n"
    data = text.encode()
    if p.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    os.replace(tmp, p)


def check_envelope(doc: Any, schema: str, max_version: int, what: str) -> int:
    """Check the ``schema``/``version`` envelope; newer versions are refused with a clear message."""
    if not isinstance(doc, dict):
        raise InputError(f"{what}: expected a JSON object at the top level")
    if doc.get("schema") != schema:
        raise InputError(f"{what}.schema: expected {schema!r}, got {doc.get('schema')!r}")
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InputError(f"{what}.version: expected a positive integer, got {version!r}")
    if version > max_version:
        raise InputError(
            f"{what}.version: {version} is newer than this moecc understands ({max_version}); upgrade moecc"
        )
    return version


class Reader:
    """Typed, path-aware access to one JSON object."""

    def __init__(self, obj: Any, path: str):
        if not isinstance(obj, dict):
            raise InputError(f"{path}: expected an object, got {type(obj).__name__}")
        self.obj = obj
        self.path = path
        self._unseen = set(obj)

    def _take(self, key: str, required: bool) -> Any:
        self._unseen.discard(key)
        value = self.obj.get(key)
        if value is None:  # absent or null: both mean "not given"
            if required:
                what = "missing required field" if key not in self.obj else "must not be null"
                raise InputError(f"{self.path}.{key}: {what}")
            return None
        return value

    def child(self, key: str, required: bool = True) -> "Reader | None":
        value = self._take(key, required)
        return None if value is None else Reader(value, f"{self.path}.{key}")

    def str(self, key: str, required: bool = True, choices: tuple[str, ...] | None = None) -> str | None:
        value = self._take(key, required)
        if value is None:
            return None
        if not isinstance(value, str):
            raise InputError(f"{self.path}.{key}: expected a string, got {value!r}")
        if choices is not None and value not in choices:
            raise InputError(f"{self.path}.{key}: {value!r} is not one of {', '.join(choices)}")
        return value

    def int(self, key: str, required: bool = True, minimum: int | None = 0) -> int | None:
        value = self._take(key, required)
        if value is None:
            return None
        return as_int(value, f"{self.path}.{key}", minimum)

    def number(self, key: str, required: bool = True, minimum: float | None = 0.0) -> float | None:
        value = self._take(key, required)
        if value is None:
            return None
        return as_number(value, f"{self.path}.{key}", minimum)

    def bool(self, key: str, required: bool = True) -> bool | None:
        value = self._take(key, required)
        if value is None:
            return None
        if not isinstance(value, bool):
            raise InputError(f"{self.path}.{key}: expected true or false, got {value!r}")
        return value

    def list(self, key: str, required: bool = True) -> list | None:
        value = self._take(key, required)
        if value is None:
            return None
        if not isinstance(value, list):
            raise InputError(f"{self.path}.{key}: expected a list, got {type(value).__name__}")
        return value

    def any(self, key: str, required: bool = True) -> Any:
        return self._take(key, required)

    def done(self) -> None:
        if self._unseen:
            key = sorted(self._unseen)[0]
            raise InputError(f"{self.path}.{key}: unknown field")


def as_int(value: Any, path: str, minimum: int | None = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{path}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{path}: must be >= {minimum}, got {value}")
    return value


def as_number(value: Any, path: str, minimum: float | None = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{path}: expected a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{path}: must be finite, got {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{path}: must be >= {minimum}, got {value}")
    return float(value)


def number_array(
    value: Any, path: str, length: int | None = None, minimum: float | None = 0.0, allow_null: bool = False,
    check: Callable[[np.ndarray], None] | None = None,
) -> np.ndarray:
    """A list of numbers as a read-only float64 array; ``null`` becomes NaN only where ``allow_null``."""
    if not isinstance(value, list):
        raise InputError(f"{path}: expected a list of numbers, got {type(value).__name__}")
    if length is not None and len(value) != length:
        raise InputError(f"{path}: expected {length} values, got {len(value)}")
    out = np.empty(len(value), dtype=np.float64)
    for i, v in enumerate(value):
        if v is None and allow_null:
            out[i] = np.nan
        else:
            out[i] = as_number(v, f"{path}[{i}]", minimum)
    out.setflags(write=False)
    return out


def number_matrix(value: Any, path: str, rows: int, lengths: list[int] | int, **kw: Any) -> list[np.ndarray]:
    """A list of ``rows`` number lists; row i must have ``lengths[i]`` values."""
    if not isinstance(value, list):
        raise InputError(f"{path}: expected a list of lists, got {type(value).__name__}")
    if len(value) != rows:
        raise InputError(f"{path}: expected {rows} rows, got {len(value)}")
    lens = lengths if isinstance(lengths, list) else [lengths] * rows
    return [number_array(v, f"{path}[{i}]", lens[i], **kw) for i, v in enumerate(value)]


def json_floats(arr: np.ndarray | list, digits: int = 9) -> list:
    """Floats for JSON with ``digits`` significant digits; NaN becomes ``null``."""
    out = []
    for v in np.asarray(arr, dtype=np.float64).tolist():
        out.append(None if v != v else float(f"{v:.{digits}g}"))
    return out
