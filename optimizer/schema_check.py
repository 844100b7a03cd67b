"""Check a ``profile.json`` or ``plan.json`` document against its JSON Schema (draft 2020-12).

The schemas (``optimizer/schemas/{profile,plan}.schema.json``) are package data and document the contracts in
a machine-checkable form; the loaders in :mod:`optimizer.profile` and :mod:`optimizer.plan` stay the
authority and also check what a schema cannot express (array lengths aligned across fields, unique block
names, ...). Errors read like the loaders' own: one line, led by the JSON path of the offending field
(``profile.experts.frequency[0][3]: must be >= 0, got -0.5``). When a document has several errors, the one
with the smallest path (then message) is reported, so the answer does not depend on the validator's order.
"""

from __future__ import annotations

import json
import math
from functools import lru_cache
from importlib import resources
from typing import Any, Iterator, Literal

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from .errors import InputError

Which = Literal["profile", "plan"]
SCHEMA_FILES: dict[str, str] = {"profile": "profile.schema.json", "plan": "plan.schema.json"}


@lru_cache(maxsize=None)
def _schema_text(which: str) -> str:
    if which not in SCHEMA_FILES:
        raise InputError(f"unknown contract {which!r}; expected one of {', '.join(SCHEMA_FILES)}")
    return resources.files("optimizer").joinpath("schemas").joinpath(SCHEMA_FILES[which]).read_text("utf-8")


def load_schema(which: Which) -> dict:
    """A fresh copy of the JSON Schema of ``which`` ("profile" or "plan")."""
    return json.loads(_schema_text(which))


@lru_cache(maxsize=None)
def _validator(which: str) -> Draft202012Validator:
    schema = load_schema(which)  # type: ignore[arg-type]
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate_with_schema(doc: dict, which: Which) -> None:
    """Raise :class:`InputError` (one line, naming the JSON path) if ``doc`` does not satisfy the schema."""
    errors = schema_errors(doc, which)
    if errors:
        raise InputError(errors[0])


def schema_errors(doc: Any, which: Which) -> list[str]:
    """Every violation as a one-line message, sorted by JSON path, then message; empty when ``doc`` is valid."""
    validator = _validator(which)
    found: dict[str, tuple] = {}
    for path, message in _non_finite(doc, ()):
        _add(found, which, path, message)
    for error in validator.iter_errors(doc):
        for path, message in _describe(error):
            _add(found, which, path, message)
    return [line for line, _ in sorted(found.items(), key=lambda item: item[1])]


# ----------------------------------------------------------------------------------------------- helpers
def _add(found: dict[str, tuple], root: str, path: tuple, message: str) -> None:
    line = f"{_render(root, path)}: {message}"
    found.setdefault(line, (tuple((0, p, "") if isinstance(p, int) else (1, 0, p) for p in path), message))


def _render(root: str, path: tuple) -> str:
    return root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _non_finite(value: Any, path: tuple) -> Iterator[tuple[tuple, str]]:
    """NaN and infinities cannot appear in JSON text, but a document built in Python may hold them."""
    if isinstance(value, float) and not math.isfinite(value):
        yield path, f"must be finite, got {value!r}"
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _non_finite(item, path + (key,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _non_finite(item, path + (i,))


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_TYPE_NAMES = {"object": "an object", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "null"}


def _describe(error: ValidationError) -> Iterator[tuple[tuple, str]]:
    """(path, message) pairs for one validation error, worded like the loaders' messages."""
    path = tuple(error.absolute_path)
    kind, value, instance = error.validator, error.validator_value, error.instance
    if "propertyNames" in error.relative_schema_path:  # the instance is a key of the object at ``path``
        path = path + (instance,)
    if kind == "additionalProperties" and isinstance(instance, dict):
        known = set(error.schema.get("properties", {}))
        for key in sorted(k for k in instance if k not in known):
            yield path + (key,), "unknown field"
        return
    if kind == "required" and isinstance(instance, dict):
        for key in value:
            if key not in instance:
                yield path + (key,), "missing required field"
        return
    if kind == "type":
        types = [value] if isinstance(value, str) else list(value)
        message = f"expected {' or '.join(_TYPE_NAMES.get(t, t) for t in types)}, got {_show(instance)}"
    elif kind == "minimum":
        message = f"must be >= {value}, got {_show(instance)}"
    elif kind == "exclusiveMinimum":
        message = f"must be > {value}, got {_show(instance)}"
    elif kind == "maximum" and path == ("version",):
        message = f"{_show(instance)} is newer than this moecc understands ({value}); upgrade moecc"
    elif kind == "maximum":
        message = f"must be <= {value}, got {_show(instance)}"
    elif kind == "enum":
        message = f"{_show(instance)} is not one of {', '.join(str(v) for v in value)}"
    elif kind == "const":
        message = f"expected {_show(value)}, got {_show(instance)}"
    elif kind == "minItems":
        message = f"expected at least {value} item{'s' if value != 1 else ''}, got {len(instance)}"
    elif kind == "maxItems":
        message = f"expected at most {value} item{'s' if value != 1 else ''}, got {len(instance)}"
    elif kind == "uniqueItems":
        message = "items must be unique"
    elif kind == "pattern":
        message = f"{_show(instance)} is not a {error.schema.get('title', 'valid value')}"
    elif kind in ("anyOf", "oneOf", "not") and "title" in error.schema:
        message = str(error.schema["title"])
    else:
        message = error.message
    yield path, message
