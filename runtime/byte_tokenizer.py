"""Byte-level tokenisation for the models trained here: ids 0..255 are bytes.

``BOS_ID`` (256) starts / separates documents, ``PAD_ID`` (257) pads; the vocabulary
is ``VOCAB_SIZE`` = 258.  A model directory declares it by a ``byte_tokenizer.json``
file (written by :func:`save_byte_tokenizer`), which the evaluation harness reads.
"""
from __future__ import annotations

import json
from pathlib import Path

BOS_ID = 256
PAD_ID = 257
VOCAB_SIZE = 258
MARKER_FILE = "byte_tokenizer.json"


def encode(text: str | bytes) -> list[int]:
    """UTF-8 bytes of ``text`` as token ids."""
    return list(text.encode("utf-8") if isinstance(text, str) else text)


def decode(ids: list[int]) -> str:
    """Inverse of :func:`encode`; special ids are dropped, bad UTF-8 replaced."""
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


def save_byte_tokenizer(directory: str | Path) -> Path:
    """Write the marker file that tells the harness this model reads bytes."""
    path = Path(directory) / MARKER_FILE
    path.write_text(json.dumps({"type": "bytes", "vocab_size": VOCAB_SIZE, "bos_token_id": BOS_ID,
                                "pad_token_id": PAD_ID}, indent=2) + "\n")
    return path


def is_byte_model(directory: str | Path) -> bool:
    """True if ``directory`` holds a byte-tokenizer marker."""
    return (Path(directory) / MARKER_FILE).is_file()
