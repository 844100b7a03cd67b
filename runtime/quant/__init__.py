"""Quantizers of the runtime: real packed storage (:func:`quantize`) and quantize-dequantize (:func:`fake_quantize`).

Every format of :mod:`optimizer.formats` is accepted; what is stored:

* ``int{b}_g{g}`` (b = 2..8): packed b-bit codes + fp16 scale + fp16 zero per group (:mod:`runtime.quant.intq`),
  by round-to-nearest (``method="rtn"``), the error-minimising ``method="hqq"``, or the calibration-based
  ``method="gptq"`` (:mod:`runtime.quant.gptq`; needs the layer's input Hessian, ``hessian=``);
* ``F32``, ``F16``, ``BF16``: the tensor in that dtype (``method`` does not apply);
* ``Q8_0``, ``Q4_0``, ``Q4_1``, ``Q5_0``, ``Q5_1``: GGUF blocks written by ``gguf.quants.quantize``
  (llama.cpp's reference quantizer; ``method`` does not apply: with ``gptq`` a one-line warning says so and
  the Hessian is unused);
* every other GGUF type (K-quants, I-quants), which gguf-py cannot quantize: the smallest runtime int format
  that admits the shape and takes at least as many bytes (``int{b}_g{g}``, g in 32/64/128), with a one-line
  ``logging.warning`` (:func:`storage_format`). Q4_K -> int4_g64, Q2_K -> int2_g32, Q6_K -> int6_g32 for rows
  divisible by 64; see ``docs/runtime.md``.

:attr:`QuantizedTensor.nbytes` equals ``get_format(qt.format).nbytes(shape)`` exactly.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from optimizer.errors import InputError
from optimizer.formats import GGUF_FAMILY, INT_BITS, INT_FAMILY, INT_GROUP_SIZES, INT_PARTS, Format, get_format

from .gptq import DEFAULT_BLOCK, DEFAULT_PERCDAMP, gptq_quantize
from .intq import dequantize_int, quantize_int

__all__ = ["QuantizedTensor", "quantize", "fake_quantize", "storage_format", "METHODS", "CALIBRATION_FREE_METHODS",
           "CALIBRATED_METHODS", "GGUF_NATIVE", "FLOAT_DTYPES"]

log = logging.getLogger(__name__)

#: methods that need nothing but the weight (what profiling offers)
CALIBRATION_FREE_METHODS = ("rtn", "hqq")
#: methods that need the layer's input Hessian (``quantize(..., hessian=H)``)
CALIBRATED_METHODS = ("gptq",)
METHODS = CALIBRATION_FREE_METHODS + CALIBRATED_METHODS
FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
#: GGUF types gguf-py (0.19) can quantize, written as GGUF blocks.
GGUF_NATIVE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


@dataclass
class QuantizedTensor:
    """A stored tensor: ``parts`` are the tensors written to the checkpoint, keyed by suffix.

    int formats: ``qcodes`` (uint8 ``[..., L*b/8]``), ``qscale`` and ``qzero`` (fp16 ``[..., L/g]``);
    GGUF block formats: ``gguf`` (uint8 ``[rows..., bytes per row]``); float formats: ``""`` (the tensor).
    """

    format: str  # storage format actually used
    shape: tuple[int, ...]
    parts: dict[str, torch.Tensor]
    requested: str = ""  # the format asked for (differs when a GGUF type was mapped)
    method: str = "rtn"
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The stored tensor as ``dtype`` in its original shape."""
        return dequantize_parts(self.format, self.shape, self.parts, dtype)


def _int_candidates() -> list[Format]:
    return [get_format(f"int{b}_g{g}") for b in INT_BITS for g in INT_GROUP_SIZES]


@lru_cache(maxsize=4096)
def _storage(name: str, shape: tuple[int, ...]) -> tuple[str, str | None]:
    fmt = get_format(name)
    if fmt.family == INT_FAMILY or fmt.name in FLOAT_DTYPES or fmt.name in GGUF_NATIVE:
        if not fmt.admits(shape):
            raise InputError(f"format {fmt.name} cannot store shape {list(shape)} (rows of {shape[-1] if shape else 1} "
                             f"are not a multiple of {fmt.block_elements})")
        return fmt.name, None
    want = fmt.nbytes(shape) if fmt.admits(shape) else None
    bpw = fmt.bits_per_weight
    fits = [c for c in _int_candidates() if c.admits(shape)]
    if want is not None:
        fits = [c for c in fits if c.nbytes(shape) >= want]
    else:
        fits = [c for c in fits if c.bits_per_weight >= bpw]
    if not fits:
        raise InputError(f"no runtime format of at least {fmt.name}'s size stores shape {list(shape)}")
    best = min(fits, key=lambda c: (c.nbytes(shape), -(c.bits or 0), c.block_elements))
    return best.name, (f"{fmt.name} cannot be quantized by gguf-py; stored as {best.name} "
                       f"({best.bits_per_weight:g} vs {bpw:g} bits per weight)")


def storage_format(name: str, shape: Sequence[int]) -> tuple[str, str | None]:
    """The format a tensor of ``shape`` is stored in when ``name`` is asked for, and a notice if it differs.

    Non-native GGUF types map to the smallest ``int{b}_g{g}`` taking at least the GGUF type's bytes for
    this shape (ties: more bits, then smaller groups).
    """
    return _storage(name, tuple(int(s) for s in shape))


_warned: set[tuple[str, str]] = set()


def quantize(weight: torch.Tensor, format_name: str, method: str = "rtn", warn: bool = True,
             hessian: torch.Tensor | None = None, percdamp: float = DEFAULT_PERCDAMP) -> QuantizedTensor:
    """Quantize ``weight`` (rows along the last dim; 1-D, 2-D or fused 3-D ``[E, out, in]``) to ``format_name``.

    ``method="gptq"`` needs ``hessian`` (``[in, in]``, or ``[E, in, in]`` for fused experts; see
    :func:`runtime.quant.gptq.gptq_quantize`) and a 2-D or 3-D weight; it applies to int storage formats;
    float formats ignore it and GGUF block formats use gguf-py's quantizer (one-line warning).
    """
    if method not in METHODS:
        raise InputError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
    if method in CALIBRATED_METHODS and hessian is None:
        raise InputError(f"method {method!r} needs calibration: pass the layer's input Hessian (hessian=X^T X); "
                         f"calibration-free methods are {', '.join(CALIBRATION_FREE_METHODS)}")
    shape = tuple(int(s) for s in weight.shape)
    stored, notice = storage_format(format_name, shape)
    if notice and warn and (format_name, stored) not in _warned:
        _warned.add((format_name, stored))
        log.warning(notice)
    fmt = get_format(stored)
    w = weight.detach()
    meta: dict = {}
    if method in CALIBRATED_METHODS and fmt.name in GGUF_NATIVE and warn and (method, fmt.name) not in _warned:
        _warned.add((method, fmt.name))
        log.warning(f"{method} applies to int formats only; {fmt.name} blocks use gguf-py's quantizer")
    if fmt.name in FLOAT_DTYPES:
        parts = {"": w.to(FLOAT_DTYPES[fmt.name]).contiguous()}
    elif fmt.family == INT_FAMILY and method == "gptq":
        int_parts = gptq_quantize(w, fmt.bits, fmt.block_elements, hessian, percdamp, DEFAULT_BLOCK)
        parts = dict(zip(INT_PARTS, int_parts))
        meta = {"percdamp": percdamp, "block": DEFAULT_BLOCK}
    elif fmt.family == INT_FAMILY:
        parts = dict(zip(INT_PARTS, quantize_int(w, fmt.bits, fmt.block_elements, method)))
    else:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import quantize as gguf_quantize

        rows = w.to(torch.float32).reshape(-1, shape[-1] if shape else 1).numpy()
        data = gguf_quantize(np.ascontiguousarray(rows), GGMLQuantizationType[fmt.name])
        parts = {"gguf": torch.from_numpy(np.ascontiguousarray(data)).reshape(*shape[:-1], -1)}
    qt = QuantizedTensor(fmt.name, shape, parts, requested=get_format(format_name).name, method=method, meta=meta)
    layout = {p.suffix: p.shape for p in fmt.parts(shape)}
    got = {k: tuple(v.shape) for k, v in parts.items()}
    if got != layout or qt.nbytes != fmt.nbytes(shape):  # an internal invariant, not user input
        raise RuntimeError(f"{fmt.name}: stored parts {got} ({qt.nbytes} bytes) for {list(shape)}, the format says "
                           f"{layout} ({fmt.nbytes(shape)} bytes)")
    return qt


def dequantize_parts(format_name: str, shape: Sequence[int], parts: dict[str, torch.Tensor],
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild a tensor from its stored ``parts`` (see :class:`QuantizedTensor`)."""
    fmt = get_format(format_name)
    shape = tuple(int(s) for s in shape)
    if fmt.name in FLOAT_DTYPES:
        return parts[""].to(dtype).reshape(shape)
    if fmt.family == INT_FAMILY:
        codes, scale, zero = (parts[name] for name in INT_PARTS)
        return dequantize_int(codes, scale, zero, fmt.bits, fmt.block_elements,
                              dtype).reshape(shape)
    if fmt.family == GGUF_FAMILY:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        data = parts["gguf"].reshape(-1, parts["gguf"].shape[-1]).numpy()
        out = gguf_dequantize(data, GGMLQuantizationType[fmt.name])
        return torch.from_numpy(np.ascontiguousarray(out)).reshape(shape).to(dtype)
    raise InputError(f"cannot dequantize format {format_name}")


def fake_quantize(weight: torch.Tensor, format_name: str, method: str = "rtn",
                  hessian: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``weight`` along its last dim (rows); same shape and dtype as the input.

    Works on 2-D weights and on fused 3-D ``[E, out, in]`` expert tensors (groups never cross rows, so each
    expert is quantized on its own; ``gptq`` then takes one Hessian per expert, ``[E, in, in]``). Equals
    ``quantize(weight, ...).dequantize()`` exactly.
    """
    return quantize(weight, format_name, method, hessian=hessian).dequantize(weight.dtype)
