"""The runtime's integer formats ``int{b}_g{g}``: group-wise asymmetric quantization, bit packing.

Storage (exactly :meth:`optimizer.formats.Format.nbytes`): per row of ``row_len`` weights, the b-bit codes
bit-packed little-endian into ``row_len * b / 8`` bytes (8 codes fill b bytes; code ``j`` of a row occupies
bits ``[j*b, (j+1)*b)``), plus one fp16 scale and one fp16 zero per group of ``g`` consecutive weights.
Dequantization: ``w = (q - zero) * scale``.

Methods:

* ``rtn``: round to nearest; the group's range (widened to include 0) maps onto ``0..2^b-1`` with an
  integer zero point.
* ``hqq``: calibration-free error minimisation. HQQ's half-quadratic solver (Badri & Shaji, 2023: an
  l_p<1 error with a proximal shrinkage step, optimising the zero point) gives robust parameters, then
  alternating least squares (re-round codes, refit scale and zero in closed form) lowers the squared error;
  every group finally keeps whichever of these and the RTN parameters has the smaller squared error
  (measured with fp16-rounded parameters), so ``hqq`` is never worse than ``rtn`` per group.
"""
from __future__ import annotations

import torch

FP16_MAX = 65504.0
FP16_TINY = 2.0 ** -24  # smallest positive fp16 (subnormal)
CHUNK_ELEMENTS = 1 << 22  # rows are processed in chunks of about this many weights


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (clamped into its finite range) and back to float32."""
    return x.clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(torch.float32)


def _codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return torch.round(w / scale + zero).clamp_(0, qmax)


def _sq_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    return ((_codes(w, scale, zero, qmax) - zero) * scale - w).pow(2).sum(dim=1, keepdim=True)


def rtn_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero (fp16-exact, as float32 ``[groups, 1]``) of groups ``w`` ``[groups, g]``."""
    qmax = 2 ** bits - 1
    lo = w.min(dim=1, keepdim=True).values.clamp(max=0.0)
    hi = w.max(dim=1, keepdim=True).values.clamp(min=0.0)
    scale = _fp16(((hi - lo) / qmax).clamp(min=FP16_TINY))
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, zero


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal operator of the l_p (p < 1) norm used by HQQ."""
    return torch.sign(x) * torch.relu(x.abs() - (1.0 / beta) * x.abs().clamp(min=1e-12).pow(p - 1.0))


def _hqq_zero(w: torch.Tensor, bits: int, iters: int = 20, p: float = 0.7, beta: float = 10.0,
              kappa: float = 1.01) -> tuple[torch.Tensor, torch.Tensor]:
    """HQQ's half-quadratic zero-point optimisation (scale fixed by the min-max range)."""
    qmax = 2 ** bits - 1
    lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
    inv = qmax / (hi - lo).clamp(min=1e-8)  # HQQ works with the inverse scale
    zero = -lo * inv
    best_zero, best_err = zero.clone(), torch.full_like(zero, float("inf"))
    for _ in range(iters):
        q = torch.round(w * inv + zero).clamp_(0, qmax)
        wr = (q - zero) / inv
        err = (w - wr).abs().mean(dim=1, keepdim=True)
        better = err < best_err
        best_err, best_zero = torch.where(better, err, best_err), torch.where(better, zero, best_zero)
        we = _shrink_lp(w - wr, beta, p)
        zero = torch.mean(q - (w - we) * inv, dim=1, keepdim=True)
        beta *= kappa
    return _fp16(1.0 / inv), _fp16(best_zero)


def _refit(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: int, rounds: int = 3):
    """Alternating least squares: codes from (scale, zero), then the L2-optimal (scale, zero) for the codes."""
    err = _sq_error(w, scale, zero, qmax)
    for _ in range(rounds):
        q = _codes(w, scale, zero, qmax)
        qm, wm = q.mean(dim=1, keepdim=True), w.mean(dim=1, keepdim=True)
        var = (q - qm).pow(2).sum(dim=1, keepdim=True)
        cov = ((q - qm) * (w - wm)).sum(dim=1, keepdim=True)
        ok = (var > 0) & (cov > 0)
        a = torch.where(ok, cov / var.clamp(min=1e-12), scale)
        new_scale = _fp16(a.clamp(min=FP16_TINY))
        new_zero = _fp16(torch.where(ok, qm - wm / new_scale, zero))
        new_err = _sq_error(w, new_scale, new_zero, qmax)
        better = new_err < err
        scale, zero = torch.where(better, new_scale, scale), torch.where(better, new_zero, zero)
        err = torch.minimum(err, new_err)
    return scale, zero, err


def hqq_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Error-minimising scale and zero (fp16-exact float32 ``[groups, 1]``) of groups ``w`` ``[groups, g]``."""
    qmax = 2 ** bits - 1
    r_scale, r_zero = rtn_params(w, bits)
    r_err = _sq_error(w, r_scale, r_zero, qmax)
    h_scale, h_zero, h_err = _refit(w, *_hqq_zero(w, bits), qmax)
    better = h_err < r_err
    return torch.where(better, h_scale, r_scale), torch.where(better, h_zero, r_zero)


PARAMS = {"rtn": rtn_params, "hqq": hqq_params}


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., L]`` (L % 8 == 0, values < 2^bits) -> packed uint8 ``[..., L*bits/8]``."""
    lead, length = codes.shape[:-1], codes.shape[-1]
    if bits == 8:
        return codes.to(torch.uint8)
    c = codes.reshape(-1, 8).to(torch.int64)
    value = (c << (torch.arange(8, dtype=torch.int64) * bits)).sum(dim=1, keepdim=True)
    out = (value >> (torch.arange(bits, dtype=torch.int64) * 8)) & 0xFF
    return out.to(torch.uint8).reshape(*lead, length * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., L*bits/8]`` -> uint8 codes ``[..., L]``."""
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    if bits == 8:
        return packed.clone()
    b = packed.reshape(-1, bits).to(torch.int64)
    value = (b << (torch.arange(bits, dtype=torch.int64) * 8)).sum(dim=1, keepdim=True)
    codes = (value >> (torch.arange(8, dtype=torch.int64) * bits)) & (2 ** bits - 1)
    return codes.to(torch.uint8).reshape(*lead, nbytes * 8 // bits)


def quantize_int(weight: torch.Tensor, bits: int, group: int, method: str = "rtn"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize along the last dim: packed codes ``[..., L*b/8]`` uint8, scales and zeros ``[..., L/g]`` fp16."""
    if method not in PARAMS:
        raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(PARAMS)}")
    shape = weight.shape
    length = shape[-1] if weight.dim() else 1
    if length % group or group % 8:
        raise ValueError(f"rows of {length} do not split into groups of {group}")
    rows = weight.reshape(-1, length)
    per_chunk = max(1, (CHUNK_ELEMENTS if method == "rtn" else CHUNK_ELEMENTS // 4) // length)  # hqq: more temporaries
    packed, scales, zeros = [], [], []
    qmax = 2 ** bits - 1
    for start in range(0, rows.shape[0], per_chunk):
        w = rows[start:start + per_chunk].to(torch.float32).reshape(-1, group)
        scale, zero = PARAMS[method](w, bits)
        q = _codes(w, scale, zero, qmax).to(torch.uint8).reshape(-1, length)
        packed.append(pack_codes(q, bits))
        scales.append(scale.to(torch.float16).reshape(-1, length // group))
        zeros.append(zero.to(torch.float16).reshape(-1, length // group))
    lead = tuple(shape[:-1])
    return (torch.cat(packed).reshape(*lead, length * bits // 8), torch.cat(scales).reshape(*lead, length // group),
            torch.cat(zeros).reshape(*lead, length // group))


def dequantize_int(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(q - zero) * scale`` from :func:`quantize_int`'s tensors, shape ``[..., L]``.

    Rows are decoded in chunks of about ``CHUNK_ELEMENTS`` weights, so the int64 unpacking temporaries stay
    small next to the output (whole-matrix unpacking of a 113 MiB embedding peaked at ~700 MiB extra)."""
    lead, nbytes = packed.shape[:-1], packed.shape[-1]
    length = nbytes * 8 // bits
    rows_packed = packed.reshape(-1, nbytes)
    rows_scale = scale.reshape(-1, length // group)
    rows_zero = zero.reshape(-1, length // group)
    out = torch.empty(rows_packed.shape[0], length, dtype=dtype)
    per_chunk = max(1, CHUNK_ELEMENTS // max(length, 1))
    for start in range(0, rows_packed.shape[0], per_chunk):
        stop = start + per_chunk
        g = unpack_codes(rows_packed[start:stop], bits).to(torch.float32).reshape(-1, group)
        s = rows_scale[start:stop].to(torch.float32).reshape(-1, 1)
        z = rows_zero[start:stop].to(torch.float32).reshape(-1, 1)
        out[start:stop] = ((g - z) * s).reshape(-1, length).to(dtype)
    return out.reshape(*lead, length)
