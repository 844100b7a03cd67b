"""A journal of measured perturbations, so an interrupted profile resumes where it stopped.

Profiling a real model is hours of "change one thing, rerun from there" (R3: ~3 s per perturbation, over a
thousand of them). Every measured effect is appended to ``PROFILE.journal.jsonl`` and flushed as soon as it
is known; ``python -m profiling run ... --resume`` reads it back and measures only what is missing. The run
deletes the journal once the profile is written.

The first line identifies the run: the settings that decide which perturbations are drawn and what they
measure (model config and checkpoint files, calibration source and token count, window, seed, formats,
quantizer, sampling sizes) and, once known, the reference NLL. Resuming with other settings, or against a
model whose reference pass now gives another NLL, is refused rather than mixing two runs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Hashable

from .model_io import ProfilingError

SCHEMA = "moecc.profile-journal"
log = logging.getLogger(__name__)


def journal_path(profile_path: Path) -> Path:
    return profile_path.with_name(profile_path.name + ".journal.jsonl")


def model_fingerprint(model_dir: Path) -> str:
    """sha256 of config.json plus the names and sizes of the weight files (cheap; not the weights' bytes)."""
    d = Path(model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes() if (d / "config.json").is_file() else b"")
    for f in sorted(d.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def _plain(v):  # numpy scalars (sampled expert indices) -> Python numbers
    return v.item() if hasattr(v, "item") else v


def _key_to_json(section: str, key: Hashable) -> list:
    return [section, [_plain(v) for v in key] if isinstance(key, tuple) else _plain(key)]


def _key_from_json(item: list) -> tuple[str, Hashable]:
    section, key = item
    return section, tuple(key) if isinstance(key, list) else key


class Journal:
    """Append-only record of ``(section, key) -> (dnll, kl)``; see the module docstring."""

    def __init__(self, path: Path, settings: dict, resume: bool):
        self.path = Path(path)
        self.settings = settings
        self.done: dict[tuple[str, Hashable], tuple[float, float]] = {}
        self.reference_nll: float | None = None
        if resume and self.path.is_file():
            self._read()
        elif resume:
            raise ProfilingError(f"--resume: no journal at {self.path} (nothing to resume; run without --resume)")
        elif self.path.is_file():
            log.warning("%s: an interrupted run's journal is replaced (pass --resume to continue it instead)",
                        self.path)
        if not self.done and self.reference_nll is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "w", encoding="utf-8")
            self._write({"schema": SCHEMA, "version": 1, "settings": settings})
        else:
            self._file = open(self.path, "a", encoding="utf-8")

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        try:
            head = json.loads(lines[0])
        except (IndexError, json.JSONDecodeError):
            raise ProfilingError(f"--resume: {self.path} is not a profiling journal") from None
        if head.get("schema") != SCHEMA:
            raise ProfilingError(f"--resume: {self.path} is not a profiling journal")
        if head.get("settings") != self.settings:
            diff = sorted(k for k in set(head.get("settings", {})) | set(self.settings)
                          if head.get("settings", {}).get(k) != self.settings.get(k))
            raise ProfilingError(f"--resume: the journal was written with other settings ({', '.join(diff)}); "
                                 f"rerun without --resume to start over")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the interruption
                continue
            if "reference_nll" in rec:
                self.reference_nll = float(rec["reference_nll"])
            elif "key" in rec:
                self.done[_key_from_json(rec["key"])] = (float(rec["dnll"]), float(rec["kl"]))

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        self._file.flush()

    def check_reference(self, nll: float) -> None:
        """Record the reference NLL, or check it against the interrupted run's (same model, same text)."""
        if self.reference_nll is None:
            self.reference_nll = nll
            self._write({"reference_nll": nll})
        elif not math.isclose(nll, self.reference_nll, rel_tol=1e-6, abs_tol=1e-9):
            raise ProfilingError(f"--resume: reference NLL is {nll:.6f}, the journal's run had "
                                 f"{self.reference_nll:.6f}: the model or text changed; rerun without --resume")

    def get(self, section: str, key: Hashable) -> tuple[float, float] | None:
        return self.done.get((section, key))

    def record(self, section: str, key: Hashable, dnll: float, kl: float) -> None:
        self.done[(section, key)] = (dnll, kl)
        self._write({"key": _key_to_json(section, key), "dnll": dnll, "kl": kl})

    def close(self, delete: bool = False) -> None:
        self._file.close()
        if delete:
            self.path.unlink(missing_ok=True)
