"""Strict, bounded reading of the JSON contracts: every error names the field it is about.

:func:`read_json` is the one reader every contract uses. It refuses, with one line and before parsing,
what would otherwise cost unbounded time or memory or end in a traceback: a path that is not a regular
file (a device such as ``/dev/zero``, a FIFO), a file or a decompressed gzip stream larger than
:func:`max_json_bytes` (default :data:`DEFAULT_MAX_JSON_BYTES`, overridable with the environment variable
:data:`MAX_JSON_BYTES_ENV`; gzip is decompressed in chunks and abandoned as soon as the cap is passed),
nesting deeper than :data:`MAX_JSON_DEPTH` (counted over the bytes without recursion), ``NaN`` /
``Infinity``, and numbers beyond :data:`MAX_JSON_NUMBER`. The limits are documented in ``docs/profile.md``
("Limits").

:class:`Reader` wraps one JSON object at a path (``profile.experts``). Taking a field removes it from the
set of unseen keys; :meth:`Reader.done` rejects what is left, so unknown keys never pass silently.
Files may be gzip-compressed (``.json.gz``).
"""

from __future__ import annotations

import builtins
import gzip
import hashlib
import json
import math
import os
import stat
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, Literal, overload

import numpy as np

from .errors import InputError

#: Default cap on a JSON file's bytes, raw and after gzip decompression (the DeepSeek-V3 example: 15 MB).
DEFAULT_MAX_JSON_BYTES = 2**30
#: Environment variable overriding :data:`DEFAULT_MAX_JSON_BYTES` (a positive integer number of bytes).
MAX_JSON_BYTES_ENV = "MOECC_MAX_JSON_BYTES"
#: Deepest nesting of objects and arrays accepted (the committed profiles and plans nest 5 deep).
MAX_JSON_DEPTH = 64
#: Largest magnitude of a JSON number: integers must fit int64 (checked where a field is read, see
#: :func:`as_int`), and no float may be larger (checked while parsing), so that sums over every block and
#: expert of a contract stay finite.
MAX_JSON_NUMBER = 2**63 - 1
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 2**24  # bytes decompressed or scanned per step
_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'"[]{}')))


def max_json_bytes() -> int:
    """The size cap in bytes: ``$MOECC_MAX_JSON_BYTES`` when set, else :data:`DEFAULT_MAX_JSON_BYTES`."""
    text = os.environ.get(MAX_JSON_BYTES_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_JSON_BYTES
    if not (text.isascii() and text.isdigit() and len(text) <= 18 and int(text) >= 1):
        raise InputError(f"{MAX_JSON_BYTES_ENV}: expected a positive number of bytes, got {text[:40]!r}")
    return int(text)


def read_json(path: str | os.PathLike) -> tuple[Any, str]:
    """Read a (possibly gzipped) JSON file; return the document and the sha256 of its canonical form."""
    p = Path(path)
    doc = parse_json(read_bytes(p), str(p))
    return doc, canonical_hash(doc)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file, gunzipped when they start with the gzip magic, at most :func:`max_json_bytes`."""
    p = Path(path)
    limit = max_json_bytes()
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer before fstat refuses it
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise InputError(f"{p}: no such file") from None
    except OSError as exc:
        raise InputError(f"{p}: cannot open ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InputError(f"{p}: is a directory, expected a JSON file")
        if not stat.S_ISREG(info.st_mode):
            raise InputError(f"{p}: not a regular file (a device, FIFO or socket), expected a JSON file")
        if info.st_size > limit:
            raise InputError(f"{p}: {info.st_size} bytes, more than the {limit}-byte limit "
                             f"(set {MAX_JSON_BYTES_ENV} to raise it)")
        with os.fdopen(os.dup(fd), "rb") as fh:
            raw = fh.read(limit + 1)  # bounded even where st_size lies (procfs files report 0)
    except OSError as exc:
        raise InputError(f"{p}: cannot read ({exc.strerror})") from None
    finally:
        os.close(fd)
    if len(raw) > limit:
        raise InputError(f"{p}: more than the {limit}-byte limit (set {MAX_JSON_BYTES_ENV} to raise it)")
    return _gunzip(raw, limit, str(p)) if raw[:2] == _GZIP_MAGIC else raw


def _gunzip(data: bytes, limit: int, where: str) -> bytes:
    """Decompress gzip ``data`` of at most ``limit`` bytes: sized first in chunks, the output thrown away, so
    that a bomb is abandoned as soon as it passes the limit without holding what it expanded to."""
    try:
        rest, size = data, 0
        while rest:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)  # the gzip wrapper: header, CRC and length checked
            pending = rest
            while not d.eof:
                piece = d.decompress(pending, min(_CHUNK, limit + 1 - size))  # one byte past the cap at most
                size += len(piece)
                if size > limit:
                    raise InputError(f"{where}: decompresses to more than the {limit}-byte limit "
                                     f"(set {MAX_JSON_BYTES_ENV} to raise it)")
                if not piece and not d.eof:  # all input consumed, no output pending: the stream stops early
                    raise InputError(f"{where}: broken gzip stream (truncated)")
                pending = d.unconsumed_tail
            rest = d.unused_data.lstrip(b"\0")  # members may follow, and zero padding as gzip allows
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{where}: broken gzip stream ({exc})") from None


def parse_json(raw: bytes, where: str) -> Any:
    """Parse UTF-8 JSON bytes within :data:`MAX_JSON_DEPTH` and :data:`MAX_JSON_NUMBER`; NaN and Infinity refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{where}: not UTF-8 text") from None
    if _too_deep(raw, MAX_JSON_DEPTH):
        raise InputError(f"{where}: objects and arrays nested deeper than {MAX_JSON_DEPTH} levels")
    non_finite: list[str] = []
    too_large: list[str] = []

    def constant(text: str) -> float:  # NaN, Infinity, -Infinity
        non_finite.append(text)
        return float(text)

    def parse_float(text: str) -> float:  # 1e999 overflows to inf
        value = float(text)
        if not -MAX_JSON_NUMBER <= value <= MAX_JSON_NUMBER:  # also false for NaN
            (too_large if math.isfinite(value) else non_finite).append(text)
        return value

    try:
        doc = json.loads(text, parse_constant=constant, parse_float=parse_float)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except ValueError:  # int() refuses literals beyond sys.get_int_max_str_digits() digits
        raise InputError(f"{where}: an integer literal is longer than {sys.get_int_max_str_digits()} digits; "
                         f"numbers must lie within {MAX_JSON_NUMBER} in magnitude") from None
    except (RecursionError, MemoryError) as exc:
        raise InputError(f"{where}: too large or too deeply nested to parse ({type(exc).__name__})") from None
    if non_finite or too_large:
        at, value = _first_bad(doc, "") or ("(a duplicated key)", math.nan if non_finite else 0.0)
        if not math.isfinite(value):
            raise InputError(f"{where}: {at}: {non_finite[0]} is not a finite number (JSON has no NaN or Infinity)")
        raise InputError(f"{where}: {at}: {too_large[0]} is out of range (at most {MAX_JSON_NUMBER} in magnitude)")
    return doc


def _show(value: Any) -> str:
    """``repr(value)`` for a one-line message, shortened; never ``int()``-to-text of a giant integer."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _too_deep(raw: bytes, limit: int) -> bool:
    """Whether ``[`` / ``{`` nest deeper than ``limit`` outside strings; a chunked byte scan, no recursion."""
    data = raw.replace(b"\\\\", b"").replace(b'\\"', b"")  # escapes gone, every quote left delimits a string
    data = data.translate(None, _NOT_STRUCTURE)  # only quotes and brackets are left: a few % of the bytes
    depth, in_string = 0, False
    for start in range(0, len(data), _CHUNK):
        a = np.frombuffer(data, np.uint8, count=min(_CHUNK, len(data) - start), offset=start)
        quotes = np.flatnonzero(a == ord('"'))
        opens = (a == ord("[")) | (a == ord("{"))
        where = np.flatnonzero(opens | (a == ord("]")) | (a == ord("}")))
        outside = where[(np.searchsorted(quotes, where) + in_string) % 2 == 0]
        if len(outside):
            levels = depth + np.cumsum(np.where(opens[outside], 1, -1))
            if levels.max() > limit:
                return True
            depth = int(levels[-1])
        in_string ^= bool(len(quotes) % 2)
    return False


def _first_bad(value: Any, path: str) -> tuple[str, Any] | None:
    """JSON path and value of the first refused number in ``value`` (only walked when the parser saw one)."""
    if isinstance(value, float) and not -MAX_JSON_NUMBER <= value <= MAX_JSON_NUMBER:
        return path or "(top level)", value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _first_bad(item, f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key))
        if found:
            return found
    return None


def canonical_hash(doc: Any) -> str:
    data = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_output_path(path: str | os.PathLike, flag: str) -> Path:
    """Refuse, before any work, an output that cannot be written: a directory, a device or FIFO (the atomic
    rename of :func:`write_json` would replace it), or a place under a file or without write permission."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{flag}: {p} is a directory")
    if p.exists() and not p.is_file():
        raise InputError(f"{flag}: {p} exists and is not a regular file")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{flag}: cannot create {p}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag}: cannot create {p}: no write permission in {parent}")
    return p


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

    # The overloads tell a type checker that a required field is never None (``_take`` raises instead).
    @overload
    def child(self, key: builtins.str, required: Literal[True] = ...) -> Reader: ...
    @overload
    def child(self, key: builtins.str, required: builtins.bool) -> Reader | None: ...

    def child(self, key: builtins.str, required: builtins.bool = True) -> Reader | None:
        value = self._take(key, required)
        return None if value is None else Reader(value, f"{self.path}.{key}")

    @overload
    def str(self, key: builtins.str, required: Literal[True] = ...,
            choices: tuple[builtins.str, ...] | None = None) -> builtins.str: ...
    @overload
    def str(self, key: builtins.str, required: builtins.bool,
            choices: tuple[builtins.str, ...] | None = None) -> builtins.str | None: ...

    def str(self, key: builtins.str, required: builtins.bool = True,
            choices: tuple[builtins.str, ...] | None = None) -> builtins.str | None:
        value = self._take(key, required)
        if value is None:
            return None
        if not isinstance(value, builtins.str):
            raise InputError(f"{self.path}.{key}: expected a string, got {_show(value)}")
        if choices is not None and value not in choices:
            raise InputError(f"{self.path}.{key}: {value!r} is not one of {', '.join(choices)}")
        return value

    @overload
    def int(self, key: builtins.str, required: Literal[True] = ..., minimum: builtins.int | None = 0,
            maximum: builtins.int = MAX_JSON_NUMBER) -> builtins.int: ...
    @overload
    def int(self, key: builtins.str, required: builtins.bool, minimum: builtins.int | None = 0,
            maximum: builtins.int = MAX_JSON_NUMBER) -> builtins.int | None: ...

    def int(self, key: builtins.str, required: builtins.bool = True, minimum: builtins.int | None = 0,
            maximum: builtins.int = MAX_JSON_NUMBER) -> builtins.int | None:
        value = self._take(key, required)
        if value is None:
            return None
        return as_int(value, f"{self.path}.{key}", minimum, maximum)

    @overload
    def number(self, key: builtins.str, required: Literal[True] = ..., minimum: float | None = 0.0,
               maximum: float = MAX_JSON_NUMBER) -> float: ...
    @overload
    def number(self, key: builtins.str, required: builtins.bool, minimum: float | None = 0.0,
               maximum: float = MAX_JSON_NUMBER) -> float | None: ...

    def number(self, key: builtins.str, required: builtins.bool = True, minimum: float | None = 0.0,
               maximum: float = MAX_JSON_NUMBER) -> float | None:
        value = self._take(key, required)
        if value is None:
            return None
        return as_number(value, f"{self.path}.{key}", minimum, maximum)

    @overload
    def bool(self, key: builtins.str, required: Literal[True] = ...) -> builtins.bool: ...
    @overload
    def bool(self, key: builtins.str, required: builtins.bool) -> builtins.bool | None: ...

    def bool(self, key: builtins.str, required: builtins.bool = True) -> builtins.bool | None:
        value = self._take(key, required)
        if value is None:
            return None
        if not isinstance(value, builtins.bool):
            raise InputError(f"{self.path}.{key}: expected true or false, got {_show(value)}")
        return value

    @overload
    def list(self, key: builtins.str, required: Literal[True] = ...) -> builtins.list: ...
    @overload
    def list(self, key: builtins.str, required: builtins.bool) -> builtins.list | None: ...

    def list(self, key: builtins.str, required: builtins.bool = True) -> builtins.list | None:
        value = self._take(key, required)
        if value is None:
            return None
        if not isinstance(value, builtins.list):
            raise InputError(f"{self.path}.{key}: expected a list, got {type(value).__name__}")
        return value

    def any(self, key: builtins.str, required: builtins.bool = True) -> Any:
        return self._take(key, required)

    def done(self) -> None:
        if self._unseen:
            key = sorted(self._unseen)[0]
            raise InputError(f"{self.path}.{key}: unknown field")


def _check_bounds(value: float, path: str, minimum: float | None, maximum: float,
                  below: str, top: str, above: str) -> None:
    """``value`` within ``[minimum, maximum]`` (``minimum`` None: -MAX_JSON_NUMBER); the messages show
    ``below`` / ``above`` for the value and ``top`` for the maximum."""
    low = -MAX_JSON_NUMBER if minimum is None else minimum
    if value < low:
        raise InputError(f"{path}: must be >= {low}, got {below}")
    if value > maximum:
        raise InputError(f"{path}: must be <= {top}, got {above}")


def as_int(value: Any, path: str, minimum: int | None = 0, maximum: int = MAX_JSON_NUMBER) -> int:
    """An integer in ``[minimum, maximum]`` (no lower bound when ``minimum`` is None; never beyond int64)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{path}: expected an integer, got {_show(value)}")
    _check_bounds(value, path, minimum, maximum, _show(value), str(maximum), _show(value))
    return value


def as_number(value: Any, path: str, minimum: float | None = 0.0, maximum: float = MAX_JSON_NUMBER) -> float:
    """A finite number in ``[minimum, maximum]`` as a float (no lower bound when ``minimum`` is None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{path}: expected a number, got {_show(value)}")
    if isinstance(value, int) and abs(value) > MAX_JSON_NUMBER:  # float() of it could overflow
        raise InputError(f"{path}: out of range (at most {MAX_JSON_NUMBER} in magnitude), got {_show(value)}")
    if not math.isfinite(value):
        raise InputError(f"{path}: must be finite, got {value!r}")
    _check_bounds(value, path, minimum, maximum, str(value), f"{maximum:g}", f"{value:g}")
    return float(value)


def number_array(
    value: Any, path: str, length: int | None = None, minimum: float | None = 0.0, allow_null: bool = False,
    check: Callable[[np.ndarray], None] | None = None, maximum: float = MAX_JSON_NUMBER,
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
            out[i] = as_number(v, f"{path}[{i}]", minimum, maximum)
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
