"""Output directories that never cost the user a file: ``--overwrite`` replaces only what moecc wrote.

Every command that writes a directory (``runtime apply``, ``runtime export``, the pruned checkpoint of the
llama.cpp export, ``experiments``' work directories) goes through :func:`output_dir`::

    check_output_dir(out, overwrite, inputs=[plan, model])      # before any heavy work
    with output_dir(out, overwrite, inputs=[plan, model], command="runtime apply") as tmp:
        ...  # write every file into tmp
    # here OUT holds the new files, or (on any exception) is exactly as it was

The rules, checked before anything is moved or deleted:

1. ``OUT`` must not be, contain, or lie inside any input path (the model, the plan, a data file): replacing it
   would delete the input.
2. An existing ``OUT`` is replaced only with ``overwrite`` and only if it is a directory that moecc wrote: it
   holds :data:`MARKER` (``moecc_output.json``, schema ``moecc.output``) saying so, or, for checkpoints written
   before the marker existed, ``runtime apply``'s ``moecc_manifest.json``. A regular file, a symlink, or a
   directory of the user's is refused, whatever ``overwrite`` says.
3. Files are written into ``.OUT.moecc-partial`` beside ``OUT`` (its own marker written first, with
   ``complete: false``); only when the block exits cleanly is the marker completed and the directory renamed
   to ``OUT`` (an old ``OUT`` is moved aside to ``.OUT.moecc-old`` and removed after the rename). On any
   exception the partial directory is removed; an ``OSError`` (disk full, read-only parent) becomes one
   :class:`~optimizer.errors.InputError` line that names ``OUT``, not the hidden directory.

A partial or old directory left by a killed run is removed on the next run only if its marker (or its
emptiness) shows that moecc made it.
"""
from __future__ import annotations

import json
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from optimizer.errors import InputError

MARKER = "moecc_output.json"
MARKER_SCHEMA = "moecc.output"
LEGACY_MANIFEST = ("moecc_manifest.json", "moecc.runtime_manifest")  # runtime apply outputs before MARKER
PARTIAL_SUFFIX = ".moecc-partial"
OLD_SUFFIX = ".moecc-old"


def _read_schema(path: Path) -> str | None:
    """The ``schema`` field of a small JSON file, or None if it is not one (never raises)."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > 1 << 20:
            return None
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return doc.get("schema") if isinstance(doc, dict) else None


def written_by_moecc(path: str | Path) -> bool:
    """Whether ``path`` is a real directory (not a symlink) that moecc wrote."""
    p = Path(path)
    if p.is_symlink() or not p.is_dir():
        return False
    if _read_schema(p / MARKER) == MARKER_SCHEMA:
        return True
    name, schema = LEGACY_MANIFEST
    return _read_schema(p / name) == schema


def _related(a: Path, b: Path) -> bool:
    """Whether one of two resolved paths is the other or lies inside it."""
    return a == b or a in b.parents or b in a.parents


def side_paths(out: str | Path) -> tuple[Path, Path]:
    """The hidden partial and old directories beside ``out``."""
    out = Path(out)
    return out.parent / f".{out.name}{PARTIAL_SUFFIX}", out.parent / f".{out.name}{OLD_SUFFIX}"


def check_output_dir(out: str | Path, overwrite: bool, inputs: Sequence[str | Path | None] = (),
                     flag: str = "-o") -> Path:
    """Refuse an output directory that could cost the user a file (see the module docstring); returns ``out``."""
    out = Path(out)
    if not out.name or out.name in (".", ".."):
        raise InputError(f"{flag}: {out} must name a new directory, not '.' or '..'")
    target = out.resolve()
    for src in inputs:
        if src is None:
            continue
        if _related(target, Path(src).resolve()):
            raise InputError(f"{flag}: {out} would overlap the input {src}; choose an output outside it")
    if out.is_symlink():
        raise InputError(f"{flag}: {out} is a symbolic link; moecc does not write through links")
    if out.exists():
        if not out.is_dir():
            raise InputError(f"{flag}: {out} exists and is not a directory; moecc will not replace it")
        if not written_by_moecc(out):
            raise InputError(f"{flag}: {out} exists and was not written by moecc (no {MARKER}); "
                             "moecc replaces only its own output directories: choose a new path")
        if not overwrite:
            raise InputError(f"{flag}: {out} exists; pass --overwrite to replace it, or choose a new path")
    return out


def _remove_stale(path: Path, out: Path, flag: str) -> None:
    """Remove a partial/old directory of an earlier run, if moecc made it."""
    if not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink() and (written_by_moecc(path) or not any(path.iterdir())):
        shutil.rmtree(path)
        return
    raise InputError(f"{flag}: {path} is in the way of writing {out} and was not made by moecc; move it away")


def _marker(command: str, inputs: Sequence[str | Path | None], complete: bool) -> str:
    doc = {"schema": MARKER_SCHEMA, "version": 1, "command": command,
           "inputs": [str(p) for p in inputs if p is not None], "complete": complete}
    return json.dumps(doc, indent=1) + "\n"


def _swap(tmp: Path, out: Path, old: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` goes to ``old`` first and comes back if the rename fails."""
    if not out.exists():
        tmp.rename(out)
        return
    out.rename(old)
    try:
        tmp.rename(out)
    except OSError:
        old.rename(out)
        raise
    shutil.rmtree(old)


@contextmanager
def output_dir(out: str | Path, overwrite: bool, inputs: Sequence[str | Path | None] = (), command: str = "",
               flag: str = "-o") -> Iterator[Path]:
    """Yield a fresh hidden directory to write into; it becomes ``out`` when the block exits cleanly."""
    out = check_output_dir(out, overwrite, inputs, flag)
    tmp, old = side_paths(out)
    command = command or " ".join(Path(a).name if i == 0 else a for i, a in enumerate(sys.argv))
    try:
        _remove_stale(tmp, out, flag)
        _remove_stale(old, out, flag)
        tmp.mkdir(parents=True)
        (tmp / MARKER).write_text(_marker(command, inputs, False), encoding="utf-8")
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{flag}: cannot write {out}: {exc.strerror or exc}") from None
    try:
        yield tmp
        (tmp / MARKER).write_text(_marker(command, inputs, True), encoding="utf-8")
        if out.exists():
            check_output_dir(out, True, inputs, flag)  # it may have changed while we worked
        _swap(tmp, out, old)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InputError(f"{flag}: cannot write {out}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
