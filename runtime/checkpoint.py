"""safetensors I/O without pickle: header reading, and a streaming writer whose header is known up front.

:func:`read_headers` lists every tensor of a checkpoint directory (``model.safetensors`` or the shards of
``model.safetensors.index.json``) from the file headers only, in file order. :class:`ShardWriter` writes one
safetensors file tensor by tensor: the full header (names, dtypes, shapes, offsets) is computed from the
planned layout first, so no tensor has to stay in memory after it is written.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch

from optimizer.errors import InputError
from optimizer.formats import DTYPE_BYTES

TORCH_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
               torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.float64: "F64"}
MAX_HEADER = 100_000_000

#: files of a ``runtime apply`` output besides its shards: the manifest (what each tensor became) and the index
MANIFEST = "moecc_manifest.json"
INDEX = "moecc.safetensors.index.json"
#: what a model directory's tokenizer and generation files are called (name prefixes and suffixes): these are
#: copied into every checkpoint moecc writes; nothing else is (weights, and the cards, metrics and logs that
#: describe the original model)
SIDE_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "special_tokens_map", "added_tokens", "generation_config",
                      "chat_template", "preprocessor_config", "byte_tokenizer", "spiece")
SIDE_FILE_SUFFIXES = (".tiktoken",)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint as its header describes it."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # start of the data within the file's data section

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPE_BYTES.get(self.dtype, 1)


def read_header(path: Path) -> dict:
    """The JSON header of one safetensors file (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise InputError(f"{path}: not a safetensors file (too short)")
            (size,) = struct.unpack("<Q", raw)
            if size > MAX_HEADER:
                raise InputError(f"{path}: not a safetensors file (header of {size} bytes)")
            header = json.loads(f.read(size))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: cannot read safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise InputError(f"{path}: safetensors header is not a JSON object")
    return header


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory, in shard order; refuses pickle-only checkpoints."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
            raise InputError(f"{index}: cannot read weight_map: {exc}") from None
        files = sorted({str(v) for v in weight_map.values()})
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise InputError(f"{model_dir}: shard {missing[0]} named by the index is missing")
        return [model_dir / f for f in files]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt*")):
        raise InputError(f"{model_dir}: only pickle checkpoints (.bin/.pt), which moecc never loads (unpickling "
                         "can run code); convert them to safetensors first, e.g. in a trusted environment: "
                         "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)")
    raise InputError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")


def read_headers(model_dir: Path) -> list[TensorInfo]:
    """Every tensor of the checkpoint, shard by shard, each shard's tensors in data order."""
    out: list[TensorInfo] = []
    seen: set[str] = set()
    for path in checkpoint_files(model_dir):
        header = read_header(path)
        items = []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                items.append(TensorInfo(name, path, str(info["dtype"]), tuple(int(s) for s in info["shape"]),
                                        int(info["data_offsets"][0])))
            except (KeyError, TypeError, ValueError, IndexError):
                raise InputError(f"{path}: malformed header entry for {name!r}") from None
            if name in seen:
                raise InputError(f"{path}: tensor {name!r} appears in more than one shard")
            seen.add(name)
        out.extend(sorted(items, key=lambda t: (t.offset, t.name)))
    return out


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to be written: name, safetensors dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * DTYPE_BYTES[self.dtype]


def header_bytes(tensors: Sequence[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The safetensors header (length prefix included) for ``tensors`` stored contiguously in this order."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors file whose tensors are announced up front and then written in order."""

    def __init__(self, path: Path, tensors: Sequence[PlannedTensor]):
        self.path = Path(path)
        self.tensors = list(tensors)
        self.next = 0
        self.header_size = 0
        self._f: BinaryIO | None = None

    def __enter__(self) -> "ShardWriter":
        self._f = open(self.path, "wb")
        head = header_bytes(self.tensors)
        self.header_size = len(head)
        self._f.write(head)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next tensor; it must match the announced name, dtype and shape."""
        if self._f is None:
            raise RuntimeError("ShardWriter used outside 'with'")
        want = self.tensors[self.next]
        dtype = TORCH_DTYPE.get(tensor.dtype)
        if name != want.name or dtype != want.dtype or tuple(tensor.shape) != want.shape:
            raise RuntimeError(f"{self.path.name}: expected {want}, got {name} {dtype} {tuple(tensor.shape)}")
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._f.write(memoryview(data))
        self.next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._f is not None
        try:
            if exc_type is None and self.next != len(self.tensors):
                raise RuntimeError(f"{self.path.name}: {len(self.tensors) - self.next} announced tensors not written")
            self._f.flush()
        finally:
            self._f.close()
            self._f = None


def is_side_file(name: str) -> bool:
    """Whether a file of a model directory is a tokenizer or generation file (see :data:`SIDE_FILE_PREFIXES`)."""
    return name.startswith(SIDE_FILE_PREFIXES) or name.endswith(SIDE_FILE_SUFFIXES)


def copy_side_files(model_dir: Path, out: Path) -> list[str]:
    """Copy the tokenizer and generation files of ``model_dir`` into ``out`` (regular files only); returns
    their names, sorted."""
    copied = []
    for src in sorted(Path(model_dir).iterdir()):
        if is_side_file(src.name) and src.is_file() and not src.is_symlink():
            shutil.copyfile(src, Path(out) / src.name)
            copied.append(src.name)
    return copied


def checkpoint_fingerprint(model_dir: Path) -> str:
    """sha256 over the checkpoint's tensor headers (name, dtype, shape, data offsets per file) and file sizes:
    identifies the source checkpoint without reading its weights."""
    digest = hashlib.sha256()
    for path in checkpoint_files(model_dir):
        digest.update(f"{path.name}:{path.stat().st_size}:".encode())
        digest.update(json.dumps(read_header(path), sort_keys=True, separators=(",", ":")).encode())
    return "sha256:" + digest.hexdigest()


def load_pretrained(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """``AutoModelForCausalLM.from_pretrained`` that can only read safetensors: the directory's weight files are
    checked first (:func:`checkpoint_files` refuses a pickle-only checkpoint in one line), then transformers is
    told ``use_safetensors=True`` and no remote code. Raises :class:`InputError` for anything it cannot load."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    path = Path(model_dir)
    if not (path.is_dir() and (path / "config.json").is_file()):
        raise InputError(f"{path} is not a model directory (no config.json)")
    checkpoint_files(path)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise InputError(f"cannot load model from {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
    return model.eval()
