"""Quantization formats and their exact storage cost.

Two families share one interface:

* **GGUF types** (``Q4_K``, ``IQ2_XXS``, ``BF16``...). Their block geometry comes from the ``gguf``
  package's own table ``GGML_QUANT_SIZES`` (elements per block, bytes per block); nothing is retyped here.
  A 2-D weight of PyTorch shape ``[rows, row_len]`` is stored row by row along ``row_len`` (ggml's ``ne0``),
  so it needs ``row_len % block_elements == 0`` and costs

      bytes = rows * (row_len / block_elements) * block_bytes.

* **Runtime integer formats** ``int{b}_g{g}`` (b = 2..8 bits, group size g along ``row_len``): codes are
  bit-packed per row into ``ceil(row_len * b / 8)`` bytes, and every group stores an fp16 scale and an fp16
  zero point (4 bytes), so

      bytes = rows * (ceil(row_len * b / 8) + (row_len / g) * 4).

A 1-D tensor (a norm, a bias) is one row. ``resolve_format`` applies llama.cpp's fallback rule for a
tensor whose rows do not divide into the format's blocks (llama-quant's ``convert_incompatible_tensor``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

from .errors import InputError

GGUF_FAMILY = "gguf"
INT_FAMILY = "int"

#: GGUF types the catalog exposes (the issue's list plus the plain float types and llama.cpp's fallbacks).
GGUF_NAMES: tuple[str, ...] = (
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K", "IQ3_XXS", "IQ3_S", "Q3_K", "IQ4_NL", "IQ4_XS",
    "Q4_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "F16", "BF16", "F32",
)

#: llama.cpp's replacement when a tensor's row length does not divide into the type's blocks.
LLAMACPP_FALLBACK: dict[str, str] = {
    "IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
    "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}

#: ``profiling run --target llamacpp``'s default candidates (those no block of the model admits are dropped; the
#: K-quants need rows divisible by 256): 2 to 8 bits as llama.cpp stores them, and BF16.
LLAMACPP_DEFAULT_FORMATS: tuple[str, ...] = ("Q2_K", "Q3_K", "Q4_0", "Q5_0", "Q6_K", "Q8_0", "BF16")

INT_BITS = range(2, 9)
INT_GROUP_SIZES = (32, 64, 128)
_INT_RE = re.compile(r"int([2-8])_g([0-9]+)")
#: bytes of per-group metadata in the runtime's integer formats: fp16 scale + fp16 zero point.
INT_GROUP_META_BYTES = 4
#: the stored parts of an int-format tensor, in this order: packed codes, fp16 scales, fp16 zero points
INT_PARTS = ("qcodes", "qscale", "qzero")
#: code width of GGUF's 32-element legacy types (the rest of each block is its scale and minimum)
GGUF_CODE_BITS = {"Q4_0": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8}
FLOAT_NAMES = ("F32", "F16", "BF16")
#: bytes per element of each safetensors dtype (a stored part's, a checkpoint tensor's)
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class StoredPart:
    """One tensor a block becomes on disk: the block's name plus ``.suffix`` (the name itself when empty)."""

    suffix: str
    dtype: str  # safetensors dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return num_elements(self.shape) * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class Format:
    """One storage format.

    ``block_elements`` consecutive elements of a row are stored in ``block_bytes`` bytes (for ``int`` formats
    a block is one quantization group and ``block_bytes`` is fractional when the packed codes of a group do
    not end on a byte; the exact byte count is computed per row by :meth:`nbytes`).
    """

    name: str
    family: str
    block_elements: int
    block_bytes: float
    bits: int | None = None  # integer code width (int formats and GGUF's legacy Q4_0..Q8_0)
    quantized: bool = True

    @property
    def bits_per_weight(self) -> float:
        """Average storage bits per weight, scale and metadata included."""
        return 8.0 * self.block_bytes / self.block_elements

    def admits(self, shape: Sequence[int]) -> bool:
        """Whether a tensor of this PyTorch shape can be stored in this format (row length divisibility)."""
        return row_length(shape) % self.block_elements == 0

    def nbytes(self, shape: Sequence[int]) -> int:
        """Exact bytes of a tensor of ``shape`` in this format; raises if the format cannot take the shape."""
        if not self.admits(shape):
            raise InputError(
                f"format {self.name} needs rows divisible by {self.block_elements}, "
                f"but shape {list(shape)} has rows of {row_length(shape)}"
            )
        rows, row_len = num_rows(shape), row_length(shape)
        if self.family == INT_FAMILY:
            assert self.bits is not None
            per_row = math.ceil(row_len * self.bits / 8) + (row_len // self.block_elements) * INT_GROUP_META_BYTES
            return rows * per_row
        return rows * (row_len // self.block_elements) * int(self.block_bytes)

    def parts(self, shape: Sequence[int]) -> tuple[StoredPart, ...]:
        """The tensors a block of PyTorch ``shape`` is stored as (their bytes add up to :meth:`nbytes`).

        Float formats: the tensor itself. Int formats: ``qcodes`` (uint8, rows bit-packed to
        ``ceil(row_len * b / 8)`` bytes), ``qscale`` and ``qzero`` (fp16, one per group). GGUF block types:
        ``gguf`` (uint8, each row's blocks as ggml lays them out).
        """
        shape = tuple(int(s) for s in shape)
        self.nbytes(shape)  # the divisibility check, with its message
        lead, row_len = shape[:-1], row_length(shape)
        if self.name in FLOAT_NAMES:
            return (StoredPart("", self.name, shape),)
        if self.family == INT_FAMILY:
            assert self.bits is not None
            groups = row_len // self.block_elements
            codes, scale, zero = INT_PARTS
            return (StoredPart(codes, "U8", (*lead, math.ceil(row_len * self.bits / 8))),
                    StoredPart(scale, "F16", (*lead, groups)), StoredPart(zero, "F16", (*lead, groups)))
        return (StoredPart("gguf", "U8", (*lead, row_len // self.block_elements * int(self.block_bytes))),)


def row_length(shape: Sequence[int]) -> int:
    """Length of one stored row: the last (input) dimension, ggml's ``ne0``."""
    return int(shape[-1]) if len(shape) else 1


def num_rows(shape: Sequence[int]) -> int:
    """Number of stored rows: the product of all but the last dimension (1 for a vector)."""
    return int(math.prod(shape[:-1])) if len(shape) > 1 else 1


def num_elements(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if len(shape) else 1


@lru_cache(maxsize=None)
def _gguf_table() -> dict[str, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    table = {}
    for name in GGUF_NAMES:
        block_elements, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        table[name] = (int(block_elements), int(block_bytes))
    return table


def _int_format(bits: int, group: int) -> Format:
    return Format(
        name=f"int{bits}_g{group}", family=INT_FAMILY, block_elements=group,
        block_bytes=group * bits / 8 + INT_GROUP_META_BYTES, bits=bits,
    )


@lru_cache(maxsize=None)
def get_format(name: str) -> Format:
    """Look up a format by name (``Q4_K``, ``bf16`` and ``int4_g128`` style names; GGUF names are case-insensitive)."""
    if not isinstance(name, str):
        raise InputError(f"format name must be a string, got {name!r}")
    m = _INT_RE.fullmatch(name.lower())
    if m:
        bits, group = int(m.group(1)), int(m.group(2))
        if group < 8 or group % 8:
            raise InputError(f"format {name}: group size must be a positive multiple of 8")
        return _int_format(bits, group)
    table = _gguf_table()
    key = name.upper()
    if key not in table:
        raise InputError(f"unknown format {name!r}; known: {', '.join(known_format_names())}")
    block_elements, block_bytes = table[key]
    return Format(
        name=key, family=GGUF_FAMILY, block_elements=block_elements, block_bytes=block_bytes,
        bits=GGUF_CODE_BITS.get(key), quantized=key not in FLOAT_NAMES,
    )


def known_format_names() -> list[str]:
    """Every name the catalog answers for (the int formats with the standard group sizes)."""
    return list(GGUF_NAMES) + [f"int{b}_g{g}" for b in INT_BITS for g in INT_GROUP_SIZES]


def resolve_format(name: str, shape: Sequence[int]) -> Format:
    """The format a tensor of ``shape`` really gets when ``name`` is asked for.

    Mirrors llama.cpp: a K- or I-quant that does not fit the row length falls back (Q6_K -> Q8_0,
    Q4_K -> Q5_0, ...); a fallback that does not fit either, or an int format that does not fit, is an error.
    """
    fmt = get_format(name)
    if fmt.admits(shape):
        return fmt
    fallback = LLAMACPP_FALLBACK.get(fmt.name)
    if fallback is not None and get_format(fallback).admits(shape):
        return get_format(fallback)
    raise InputError(f"no storage for shape {list(shape)} in format {fmt.name} (row length {row_length(shape)})")


def stand_in_group(row_len: int) -> int | None:
    """The int group for rows a model's main group does not divide (R3's experts are 80 wide, R4's 40): the
    largest multiple of 8 up to the largest standard group that divides the row, else None (no int format)."""
    return next((g for g in range(max(INT_GROUP_SIZES), 7, -8) if row_len % g == 0), None)


def same_bits_stand_in(name: str, admitted: Iterable[str]) -> str | None:
    """The format a block gets in a plan that puts every block in int format ``name``, among the formats the
    block ``admitted``: ``name`` itself; else the int format of the same bits with the largest group (a row of 80
    cannot be split into groups of 64: ``int3_g64`` stands in as ``int3_g80``, as llama.cpp stores a tensor
    whose rows do not divide into a K-quant's blocks in a legacy type); else ``None`` (the caller decides).
    Always ``name`` or ``None`` for a GGUF or float format."""
    admitted = list(admitted)
    if name in admitted:
        return name
    fmt = get_format(name)
    if fmt.family != INT_FAMILY:
        return None
    same = [get_format(a) for a in admitted]
    same = [f for f in same if f.family == INT_FAMILY and f.bits == fmt.bits]
    return max(same, key=lambda f: f.block_elements).name if same else None


def sort_by_size(names: Iterable[str]) -> list[str]:
    """Format names ordered by bits per weight (then name), smallest first."""
    return sorted(set(names), key=lambda n: (get_format(n).bits_per_weight, get_format(n).name))
