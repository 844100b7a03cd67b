"""GPTQ (Frantar et al., 2022) onto the runtime's ``int{b}_g{g}`` grid: same storage as ``rtn``, lower output error.

For a linear weight ``W`` ``[out, in]`` whose inputs ``x`` (rows of ``X`` ``[N, in]``) are known, GPTQ minimises
the layer's output error ``||X W^T - X Q^T||^2 = sum_rows (w - q) H (w - q)^T / 2`` with the Hessian
``H = 2 X^T X / N``, column by column (Optimal Brain Quantization with a fixed column order):

1. dead inputs (``H_jj = 0``: the input is always 0) get ``H_jj = 1`` and ``W[:, j] = 0``;
   damping ``H += lambda I`` with ``lambda = percdamp * mean(diag H)`` (raised x10 while Cholesky fails);
2. ``U`` = upper Cholesky factor of ``H^{-1}`` (``H^{-1} = U^T U``): row ``j`` of ``U`` holds, scaled by
   ``U_jj``, how the optimal update of the not-yet-quantized columns ``j+1..`` responds to column ``j``'s error;
3. columns ``j = 0..in-1`` left to right: when ``j`` starts a group of ``g`` columns, the group's scale and
   zero are fitted (:func:`~runtime.quant.intq.rtn_params`: min/max of the group widened to 0, fp16 scale,
   integer zero) on the *current, already error-updated* weights ``W[:, j:j+g]`` (GPTQ's
   ``static_groups=False``); column ``j`` is rounded to ``q_j``, its scaled error ``e = (w_j - q_j) / U_jj``
   is propagated ``W[:, k] -= e * U_jk`` for ``k > j``.
   The propagation runs inside blocks of ``block`` columns (a multiple of ``g``), and one matrix product
   carries a finished block's errors to the columns right of it (GPTQ's lazy batch updates; same result).

Codes, scales and zeros land in exactly :func:`~runtime.quant.intq.quantize_int`'s layout, so storage and
``dequantize`` are unchanged. With ``H`` a multiple of the identity, ``U`` is diagonal, no error reaches
another column, and the codes equal RTN's bit for bit (tested). Fused expert tensors ``[E, out, in]`` take a
Hessian per expert, ``[E, in, in]``, and are processed as one batch.
"""
from __future__ import annotations

import torch

from optimizer.errors import InputError

from .intq import pack_codes, rtn_params

__all__ = ["gptq_quantize", "inverse_cholesky_upper", "DEFAULT_PERCDAMP", "DEFAULT_BLOCK"]

DEFAULT_PERCDAMP = 0.01
DEFAULT_BLOCK = 128
_DAMP_RETRIES = 6  # each retry multiplies the damping by 10


def inverse_cholesky_upper(hessian: torch.Tensor, percdamp: float = DEFAULT_PERCDAMP) -> torch.Tensor:
    """Upper ``U`` with ``U^T U = (H + lambda I)^{-1}``, ``lambda = percdamp * mean(diag H)``; batched ``[..., n, n]``.

    Computed in float64; a batch member whose Cholesky factorisation fails gets 10x more damping (at most
    ``_DAMP_RETRIES`` times). ``hessian`` must have no zero diagonal (handle dead inputs first).
    """
    h = hessian.to(torch.float64)
    n = h.shape[-1]
    eye = torch.eye(n, dtype=torch.float64)
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)  # [...]
    damp = torch.full_like(mean_diag, float(percdamp))
    for _ in range(_DAMP_RETRIES + 1):
        chol, info = torch.linalg.cholesky_ex(h + (damp * mean_diag)[..., None, None] * eye)
        failed = info != 0
        if not bool(failed.any()):
            break
        damp = torch.where(failed, damp * 10.0, damp)
    else:
        raise InputError(f"GPTQ: the Hessian is not positive definite even with damping {float(damp.max()):g} "
                         "x mean(diag); check the calibration inputs for NaN/inf")
    inverse = torch.cholesky_inverse(chol)
    return torch.linalg.cholesky(inverse, upper=True)


def _check(weight: torch.Tensor, bits: int, group: int, hessian: torch.Tensor) -> torch.Tensor:
    """``hessian`` as ``[E, in, in]`` for ``weight`` ``[E, out, in]`` (2-D weights: E = 1); raises InputError."""
    if weight.dim() not in (2, 3):
        raise InputError(f"GPTQ quantizes 2-D [out, in] or fused 3-D [E, out, in] weights, got shape "
                         f"{list(weight.shape)}")
    if not 2 <= bits <= 8:
        raise InputError(f"GPTQ: bits must be 2..8, got {bits}")
    n = weight.shape[-1]
    if group < 8 or group % 8 or n % group:
        raise InputError(f"GPTQ: rows of {n} do not split into groups of {group}")
    lead = weight.shape[0] if weight.dim() == 3 else 1
    h = hessian.detach()
    if h.dim() == 2:
        h = h.unsqueeze(0)
    if h.dim() != 3 or tuple(h.shape[-2:]) != (n, n) or h.shape[0] not in (1, lead):
        want = f"[{n}, {n}]" if weight.dim() == 2 else f"[{lead}, {n}, {n}] (or one shared [{n}, {n}])"
        raise InputError(f"GPTQ: Hessian of shape {list(hessian.shape)} does not fit weight {list(weight.shape)}; "
                         f"expected {want}")
    if not bool(torch.isfinite(h).all()):
        raise InputError("GPTQ: the Hessian has NaN or infinite entries")
    return h.expand(lead, n, n)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, bits: int, group: int, hessian: torch.Tensor,
                  percdamp: float = DEFAULT_PERCDAMP, block: int = DEFAULT_BLOCK
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ-quantize ``weight`` ``[out, in]`` (``hessian`` ``[in, in]``) or ``[E, out, in]`` (``[E, in, in]``).

    Returns packed uint8 codes ``[..., in*bits/8]`` and fp16 scales and zeros ``[..., in/group]``, as
    :func:`~runtime.quant.intq.quantize_int` does; dequantize with ``(q - zero) * scale``. ``hessian`` need
    not be normalised (GPTQ is invariant to its scale; the damping is relative to its mean diagonal).
    """
    h = _check(weight, bits, group, hessian).to(torch.float64).clone()
    w = weight.detach().to(torch.float32).reshape(-1, *weight.shape[-2:]).clone()  # [E, out, n]
    experts, rows, n = w.shape
    qmax = 2 ** bits - 1
    diag = h.diagonal(dim1=-2, dim2=-1)  # a view: writes go to h
    dead = diag == 0
    if bool(dead.any()):
        diag[dead] = 1.0
        w.masked_fill_(dead.unsqueeze(1), 0.0)
    u = inverse_cholesky_upper(h, percdamp).to(torch.float32)  # [E, n, n]
    del h, diag
    block = max(group, -(-block // group) * group)  # a multiple of the group: groups never straddle blocks
    codes = torch.empty(experts, rows, n, dtype=torch.uint8)
    scales = torch.empty(experts, rows, n // group, dtype=torch.float32)
    zeros = torch.empty_like(scales)
    scale = zero = None
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        w1 = w[..., b0:b1].clone()  # the block's columns, updated in place
        err = torch.empty_like(w1)  # scaled errors (w - q) / U_jj
        u1 = u[:, b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:
                s, z = rtn_params(w1[..., i:i + group].reshape(-1, group), bits)
                scale, zero = s.reshape(experts, rows), z.reshape(experts, rows)
                scales[..., col // group], zeros[..., col // group] = scale, zero
            x = w1[..., i]
            q = torch.round(x / scale + zero).clamp_(0, qmax)
            codes[..., col] = q.to(torch.uint8)
            e = (x - (q - zero) * scale) / u1[:, i, i].unsqueeze(1)
            err[..., i] = e
            w1[..., i + 1:] -= e.unsqueeze(-1) * u1[:, i, i + 1:].unsqueeze(1)
        if b1 < n:
            w[..., b1:] -= torch.bmm(err, u[:, b0:b1, b1:])
    lead = tuple(weight.shape[:-1])
    return (pack_codes(codes, bits).reshape(*lead, n * bits // 8),
            scales.to(torch.float16).reshape(*lead, n // group), zeros.to(torch.float16).reshape(*lead, n // group))
