"""safetensors I/O without pickle: header reading, and a streaming writer whose header is known up front.

:func:`read_headers` lists every tensor of a checkpoint directory (``model.safetensors`` or the shards of
``model.safetensors.index.json``) from the file headers only, in file order. :class:`ShardWriter` writes one
safetensors file tensor by tensor: the full header (names, dtypes, shapes, offsets) is computed from the
planned layout first, so no tensor has to stay in memory after it is written.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch

from optimizer.errors import InputError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
TORCH_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
               torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.float64: "F64"}
MAX_HEADER = 100_000_000


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
        raise InputError(f"{model_dir}: only pickle checkpoints (.bin/.pt); convert to safetensors first "
                         "(moecc never unpickles weights)")
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
