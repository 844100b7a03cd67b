"""runtime.quant.intq's inner steps against values traced by hand (arithmetic in the comments).

Every group here is made of binary fractions, so the float32 arithmetic of the code is exact and the
expected values are exact too: the HQQ solver (``_hqq_zero``: codes, residual, proximal shrinkage, zero
update, best-so-far), its least-squares polish (``_refit``), the choice between HQQ and RTN
(``hqq_params``), argument checking of ``quantize_int``, and the chunked decoding of ``dequantize_int``.
HQQ's iterations are observed through ``_shrink_lp``, which the solver calls once per iteration with the
residual ``w - w_r`` it shrinks.
"""
from __future__ import annotations

import math

import pytest
import torch

from runtime.quant import intq
from runtime.quant.intq import dequantize_int, hqq_params, pack_codes, quantize_int, rtn_params, unpack_codes

_hqq_zero, _refit, _shrink_lp, _sq_error = intq._hqq_zero, intq._refit, intq._shrink_lp, intq._sq_error


def _col(v: float) -> torch.Tensor:
    return torch.tensor([[v]])


def _fp16(v: float) -> float:
    return float(torch.tensor(v).half())


def _spy(monkeypatch: pytest.MonkeyPatch, stub=None) -> list:
    """Record (x, beta, p) of every _shrink_lp call; ``stub`` replaces the shrinkage if given."""
    calls: list = []
    real = intq._shrink_lp

    def spy(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
        calls.append((x.clone(), beta, p))
        return stub(x) if stub is not None else real(x, beta, p)

    monkeypatch.setattr(intq, "_shrink_lp", spy)
    return calls


# ----------------------------------------------------------------------------------------------- _sq_error


def test_sq_error_uses_clamped_codes() -> None:
    # scale 1, zero 1, qmax 3: codes round(w + 1) clamped into 0..3
    #   w = 10 -> 11 -> 3 -> (3 - 1) * 1 = 2, error 64;  w = -5 -> -4 -> 0 -> -1, error 16
    #   w = 0.5 -> round(1.5) = 2 -> 1, error 0.25;  w = 1 -> 2 -> 1, error 0
    w = torch.tensor([[10.0, -5.0, 0.5, 1.0]])
    err = _sq_error(w, _col(1.0), _col(1.0), 3)
    assert err.shape == (1, 1) and err.item() == 64.0 + 16.0 + 0.25


# ----------------------------------------------------------------------------------------------- _shrink_lp


def test_shrink_lp_by_hand() -> None:
    # sign(x) * max(|x| - |x|^(p - 1) / beta, 0) with p = 0.5, beta = 10:
    #   |x| = 4: 4 - 0.5 / 10 = 3.95;  |x| = 0.25: 0.25 - 2 / 10 = 0.05;  |x| = 0.01: 0.01 - 10 / 10 < 0 -> 0
    #   x = 0 and x = 1e-13 (|x| clamped to 1e-12 inside the power): 0
    x = torch.tensor([4.0, -4.0, 0.25, -0.25, 0.01, -0.01, 0.0, 1e-13])
    got = _shrink_lp(x, 10.0, 0.5)
    want = [3.95, -3.95, 0.05, -0.05, 0.0, 0.0, 0.0, 0.0]
    assert not torch.isnan(got).any()
    for g, e in zip(got.tolist(), want):
        assert g == pytest.approx(e, abs=1e-6)
    # p = 0.7, beta = 4: |x| = 2 -> 2 - 2^-0.3 / 4;  |x| = 0.5 -> 0.5 - 0.5^-0.3 / 4
    got = _shrink_lp(torch.tensor([2.0, -0.5]), 4.0, 0.7).tolist()
    assert got[0] == pytest.approx(2 - 2 ** -0.3 / 4, rel=1e-6)
    assert got[1] == pytest.approx(-(0.5 - 0.5 ** -0.3 / 4), rel=1e-6)


# ----------------------------------------------------------------------------------------------- _hqq_zero

# lo = -1, hi = 0.5: at 2 bits inv = 3 / 1.5 = 2 (scale 0.5), zero_0 = -lo * inv = 2
W_HQQ = [-1.0, -0.625, -0.375, -0.125, -0.125, 0.375, 0.375, 0.5]


def test_hqq_scale_is_the_min_max_range_over_qmax() -> None:
    w = torch.tensor([W_HQQ])
    assert _hqq_zero(w, 2, iters=1)[0].item() == 0.5  # 1.5 / 3
    assert _hqq_zero(w, 3, iters=1)[0].item() == _fp16(1.5 / 7)
    assert _hqq_zero(w, 4, iters=1)[0].item() == _fp16(0.1)  # 1.5 / 15
    # one iteration only evaluates zero_0 = -lo * inv
    assert _hqq_zero(w, 3, iters=1)[1].item() == _fp16(7 / 1.5)


def test_hqq_two_iterations_by_hand(monkeypatch: pytest.MonkeyPatch) -> None:
    """p = 0.5, beta = 8 (threshold |x|^1.5 <= 1/8: every |x| <= 0.25 shrinks to 0), kappa = 2.

    iteration 1, zero = 2: w * 2 + 2 = [0, .75, 1.25, 1.75, 1.75, 2.75, 2.75, 3] -> q = [0, 1, 1, 2, 2, 3, 3, 3]
      w_r = (q - 2) / 2 = [-1, -.5, -.5, 0, 0, .5, .5, .5];  x = w - w_r = [0, -1/8, 1/8, -1/8, -1/8, -1/8, -1/8, 0]
      error = mean |x| = 6/8 * 1/8 = 0.09375;  shrink(x) = 0
      zero_1 = mean(q - (w - 0) * 2) = 15/8 - 2 * (-1/8) = 2.125
    iteration 2 (beta = 16), zero = 2.125: w * 2 + zero = [.125, .875, 1.375, 1.875, 1.875, 2.875, 2.875, 3.125]
      -> the same codes; x = x_1 + 0.125 / 2 = x_1 + 0.0625
      error = (7 * 0.0625 + 0.1875) / 8 = 0.078125 < 0.09375: zero_1 is the best
    """
    calls = _spy(monkeypatch)
    scale, zero = _hqq_zero(torch.tensor([W_HQQ]), 2, iters=2, p=0.5, beta=8.0, kappa=2.0)
    assert scale.item() == 0.5 and zero.item() == 2.125
    assert len(calls) == 2
    x1 = [0.0, -0.125, 0.125, -0.125, -0.125, -0.125, -0.125, 0.0]
    assert calls[0][0].tolist() == [x1] and calls[0][1:] == (8.0, 0.5)
    assert calls[1][0].tolist() == [[v + 0.0625 for v in x1]] and calls[1][1:] == (16.0, 0.5)


def test_hqq_keeps_the_earlier_zero_on_a_tie() -> None:
    """lo = 0, hi = 3: inv = 1, zero_0 = 0, q = round(w) = [0, 3, 0, 1, 1, 2, 1, 3].

    x = w - q = [0, 0, 1/8, 1/8, 1/8, 1/8, -1/8, -1/8], error 6/8 * 1/8 = 0.09375; shrunk to 0, so
    zero_1 = -mean(x) = -1/32; codes unchanged, x + (-1/32) = [-1/32, -1/32, 3/32 x4, -5/32 x2],
    error (2 + 12 + 10) / 32 / 8 = 0.09375: a tie, and only a strictly smaller error replaces the best zero.
    """
    w = torch.tensor([[0.0, 3.0, 0.125, 1.125, 1.125, 2.125, 0.875, 2.875]])
    scale, zero = _hqq_zero(w, 2, iters=2, p=0.5, beta=8.0, kappa=2.0)
    assert scale.item() == 1.0 and zero.item() == 0.0


@pytest.mark.parametrize("shift,x2", [
    # zero_1 = -1: codes round(w - 1) = [-1, 2, -1, 0, 0, 1, 0, 2] clamp to [0, 2, 0, 0, 0, 1, 0, 2];
    #   w_r = q + 1 = [1, 3, 1, 1, 1, 2, 1, 3]
    (-1.0, [-1.0, 0.0, -0.875, 0.125, 0.125, 0.125, -0.125, -0.125]),
    # zero_1 = +1: codes round(w + 1) = [1, 4, 1, 2, 2, 3, 2, 4] clamp to [1, 3, 1, 2, 2, 3, 2, 3];
    #   w_r = q - 1 = [0, 2, 0, 1, 1, 2, 1, 2]
    (1.0, [0.0, 1.0, 0.125, 0.125, 0.125, 0.125, -0.125, 0.875]),
])
def test_hqq_codes_stay_in_range_when_the_zero_moves(monkeypatch: pytest.MonkeyPatch, shift: float,
                                                     x2: list) -> None:
    """A shrinkage that returns x + c moves the zero by c * inv: zero_1 = mean(q - (w_r - c) * inv) = zero_0 + c
    (inv = 1 here), pushing codes past 0 and 3; they must be clamped into 0..qmax."""
    calls = _spy(monkeypatch, stub=lambda x: x + shift)
    w = torch.tensor([[0.0, 3.0, 0.125, 1.125, 1.125, 2.125, 0.875, 2.875]])
    _hqq_zero(w, 2, iters=2)
    assert calls[0][0].tolist() == [[0.0, 0.0, 0.125, 0.125, 0.125, 0.125, -0.125, -0.125]]
    assert calls[1][0].tolist() == [x2]


def test_hqq_defaults_are_the_published_hyperparameters(monkeypatch: pytest.MonkeyPatch) -> None:
    """HQQ (Badri & Shaji, 2023): 20 iterations, p = 0.7, beta = 10 growing by kappa = 1.01 per iteration."""
    calls = _spy(monkeypatch)
    _hqq_zero(torch.tensor([W_HQQ]), 2)
    assert len(calls) == 20
    assert all(p == 0.7 for _, _, p in calls)
    for k, (_, beta, _) in enumerate(calls):
        assert beta == pytest.approx(10.0 * 1.01 ** k, rel=1e-12)


# ----------------------------------------------------------------------------------------------- _refit

# scale 1, zero 0, qmax 3: codes round(w) = [0, 1, 2, 4 -> 3]; w = 1.25 q + 0.25 * [1, -1, -1, 1] on them
W_REFIT = [0.25, 1.0, 2.25, 4.0]


def test_refit_one_least_squares_step_by_hand() -> None:
    """q = [0, 1, 2, 3] (4 clamped to 3), q_mean 1.5, w_mean 1.875:
    var = 2.25 + .25 + .25 + 2.25 = 5;  cov = 1.5*1.625 + .5*.875 + .5*.375 + 1.5*2.125 = 6.25
    scale = cov / var = 1.25, zero = q_mean - w_mean / scale = 1.5 - 1.5 = 0.
    Error before: (0.25^2 + 0 + 0.25^2 + (4 - 3)^2) = 1.125 (clamped code 3); after: codes round(w / 1.25) =
    [0, 1, 2, 3], error 4 * 0.25^2 = 0.25. Later rounds find the same codes, hence the same fit and error."""
    w = torch.tensor([W_REFIT])
    scale, zero, err = _refit(w, _col(1.0), _col(0.0), 3)
    assert (scale.item(), zero.item(), err.item()) == (1.25, 0.0, 0.25)
    # rounds = 0: the starting error, with the code of 4 clamped to 3 (unclamped it would be 0.125)
    scale, zero, err = _refit(w, _col(1.0), _col(0.0), 3, rounds=0)
    assert (scale.item(), zero.item(), err.item()) == (1.0, 0.0, 1.125)


def test_refit_small_variance_and_covariance() -> None:
    """Weights of small magnitude: q = [0 x7, 1] (0.375 / 0.3125 = 1.2 -> 1), var = 7/64 + 49/64 = 0.875 < 1,
    cov = 7 * (1/8)(0.375/8) + (7/8)(7 * 0.375/8) = 0.328125 < 1; scale = cov / var = 0.375, zero = 1/8 - (0.375/8)
    / 0.375 = 0: exact, error 0 (from (0.375 - 0.3125)^2 = 0.00390625)."""
    w = torch.tensor([[0.0] * 7 + [0.375]])
    scale, zero, err = _refit(w, _col(0.3125), _col(0.0), 3, rounds=1)
    assert (scale.item(), zero.item(), err.item()) == (0.375, 0.0, 0.0)


def test_refit_returns_the_error_of_clamped_codes() -> None:
    """A constant group: HQQ's min-max scale (1e-8 / 3) rounds to fp16 0 and its zero clamps to -65504, so all
    codes are qmax. The fallback scale 2^-24 would need codes near 2^22 to rebuild 0.25, which clamp to 3:
    its clamped error, 8 * (0.25 - 65507 * 2^-24)^2, is the one reported, and RTN wins."""
    w = torch.full((1, 8), 0.25)
    scale, zero, err = _refit(w, _col(0.0), _col(-65504.0), 3, rounds=1)
    assert (scale.item(), zero.item()) == (2.0 ** -24, -65504.0)
    assert err.item() == pytest.approx(8 * (0.25 - 65507 * 2.0 ** -24) ** 2, rel=1e-5)
    # RTN: lo widened to 0, scale fp16(0.25 / 3), integer zero 0 -- hqq keeps it
    s, z = hqq_params(w, 2)
    assert (s.item(), z.item()) == (_fp16(0.25 / 3), 0.0)


@pytest.mark.parametrize("d,scale0,zero0,codes", [
    ([1, 1, 2, 3, 3, 1, 3, 2], 0.066650390625, -1501.0, [1, 1, 2, 3, 3, 1, 3, 2]),
    ([6, 6, 8, 8, 8, 8, 8, 1], 0.2332763671875, -429.0, [2, 2, 3, 3, 3, 3, 3, 0]),
])
def test_refit_slope_of_a_group_far_from_zero(d: list, scale0: float, zero0: float, codes: list) -> None:
    """w = 100 + d / 10 (HQQ's starting parameters given): the least-squares slope cov / var must be formed from
    centred codes *and* centred weights, else the offset of 100 cancels in float32 and moves the fp16 scale.
    Expected: the float64 least-squares fit of the codes, rounded to fp16 (scale), then zero = q_mean - w_mean /
    scale rounded to fp16 -- for d = [1, 1, 2, 3, 3, 1, 3, 2] the codes are d itself: slope 0.1, zero 2 - 100.2 /
    fp16(0.1) = -1000.24 -> -1000."""
    w = torch.tensor([[100 + v / 10 for v in d]])
    assert intq._codes(w, _col(scale0), _col(zero0), 3).tolist() == [[float(c) for c in codes]]
    wf = w[0].double().tolist()
    qm, wm = sum(codes) / 8, sum(wf) / 8
    slope = sum((q - qm) * (x - wm) for q, x in zip(codes, wf)) / sum((q - qm) ** 2 for q in codes)
    scale, zero, _ = _refit(w, _col(scale0), _col(zero0), 3, rounds=1)
    assert scale.item() == _fp16(slope)
    assert zero.item() == _fp16(qm - wm / _fp16(slope))


# found by search: a 4th least-squares round still lowers this group's error at 2 bits
W_ROUNDS = [0.0, -2.0, 0.0, 2.25, 0.0, 0.25, -1.25, -1.0]


def test_refit_default_is_three_rounds() -> None:
    w = torch.tensor([W_ROUNDS])
    s0, z0 = _hqq_zero(w, 2)
    default = _refit(w, s0, z0, 3)
    three = _refit(w, s0, z0, 3, rounds=3)
    four = _refit(w, s0, z0, 3, rounds=4)
    assert all(torch.equal(a, b) for a, b in zip(default, three))
    assert four[2].item() < three[2].item()  # so the default is observably not 4


# found by search: HQQ's parameters here are (0.321533203125, 4.58984375); the least-squares round finds scale
# 0.3212890625 with the same zero, whose float32 squared error is exactly the same
W_TIE = [-0.5, -1.25, -1.375, -0.25, 0.375, -0.5, 0.875, -0.5]


def test_refit_keeps_parameters_on_a_tie() -> None:
    g = torch.tensor([W_TIE])
    s0, z0 = _hqq_zero(g, 3)
    assert (s0.item(), z0.item()) == (0.321533203125, 4.58984375)
    err0 = _sq_error(g, s0, z0, 7)
    assert torch.equal(_sq_error(g, _col(0.3212890625), z0, 7), err0)  # the tie
    for rounds in (1, 3):
        scale, zero, err = _refit(g, s0, z0, 7, rounds=rounds)
        assert (scale.item(), zero.item()) == (0.321533203125, 4.58984375) and torch.equal(err, err0)


# ----------------------------------------------------------------------------------------------- hqq_params


def test_hqq_keeps_rtn_on_a_tie() -> None:
    """[3 x4, 9 x4] at 2 bits: RTN widens to [0, 9]: scale 3, zero 0, codes 1 and 3, exact. HQQ: lo 3, hi 9,
    scale 2, zero -1.5, codes 0 and 3, exact too. Both errors are 0; RTN is kept unless HQQ is strictly better."""
    w = torch.tensor([[3.0] * 4 + [9.0] * 4])
    assert [t.item() for t in _hqq_zero(w, 2)] == [2.0, -1.5]
    s, z = hqq_params(w, 2)
    assert (s.item(), z.item()) == (3.0, 0.0)


# found by search: at 8 bits RTN's code of the maximum rounds to 256 and is clamped to 255
W_CLAMP = [v / 32 for v in (13, -51, 0, 30, -4, 35, 0, 36)]


def _sq(w: list, scale: float, zero: float, qmax: int | None) -> float:
    codes = [round(x / scale + zero) for x in w]
    if qmax is not None:
        codes = [min(max(c, 0), qmax) for c in codes]
    return sum(((c - zero) * scale - x) ** 2 for c, x in zip(codes, w))


def test_hqq_compares_against_rtn_with_clamped_codes() -> None:
    """RTN: lo -51/32, hi 36/32, scale fp16(2.71875 / 255) = 1397 * 2^-17 = 0.01065826416015625, zero
    round(1.59375 / scale) = round(149.53) = 150; the maximum's code 1.125 / scale + 150 = 255.55 -> 256, clamped to
    255. Squared errors: RTN 8.60e-5 with the clamp (7.42e-5 if the code could be 256), HQQ 8.00e-5 in between:
    HQQ must be kept, as it is better than what RTN really stores."""
    w = torch.tensor([W_CLAMP])
    rs, rz = rtn_params(w, 8)
    assert (rs.item(), rz.item()) == (1397 * 2.0 ** -17, 150.0)
    s, z = hqq_params(w, 8)
    assert (s.item(), z.item()) != (rs.item(), rz.item())
    hqq_err = _sq(W_CLAMP, s.item(), z.item(), 255)
    assert hqq_err < 0.99 * _sq(W_CLAMP, rs.item(), rz.item(), 255)
    assert hqq_err > 1.01 * _sq(W_CLAMP, rs.item(), rz.item(), None)  # why the clamp matters here
    assert torch.equal(quantize_int(w, 8, 8, "hqq")[1].float(), s.reshape(1, 1))


# ----------------------------------------------------------------------------------------------- quantize_int


def test_quantize_default_method_is_rtn() -> None:
    w = torch.tensor([[0.5, 0.9, 2.1, 3.2, 4.2, 6.0, 5.1, 1.2]])
    default = quantize_int(w, 2, 8)
    rtn = quantize_int(w, 2, 8, "rtn")
    assert all(torch.equal(a, b) for a, b in zip(default, rtn))
    assert default[1].tolist() == [[2.0]]


def test_quantize_rejects_unknown_methods_and_bad_groups() -> None:
    with pytest.raises(ValueError, match=r"^unknown quantization method 'gptq'; choose one of rtn, hqq$"):
        quantize_int(torch.zeros(1, 8), 4, 8, "gptq")
    # rows of 48 in groups of 32: 48 % 32 = 16, though 32 % 8 == 0
    with pytest.raises(ValueError, match=r"^rows of 48 do not split into groups of 32$"):
        quantize_int(torch.zeros(2, 48), 4, 32)
    # groups of 12 split rows of 24 but are not a multiple of 8
    with pytest.raises(ValueError, match=r"^rows of 24 do not split into groups of 12$"):
        quantize_int(torch.zeros(2, 24), 4, 12)
    # a 0-dim tensor is one row of length 1
    with pytest.raises(ValueError, match=r"^rows of 1 do not split into groups of 8$"):
        quantize_int(torch.tensor(1.0), 4, 8)


# ----------------------------------------------------------------------------------------------- unpack / dequantize


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_unpacked_codes_are_uint8(bits: int) -> None:
    codes = torch.tensor([[0, 1, 2, 3, 3, 2, 1, 0]], dtype=torch.uint8)
    out = unpack_codes(pack_codes(codes, bits), bits)
    assert out.dtype == torch.uint8 and torch.equal(out, codes)


def _dequant_case() -> tuple:
    """5 rows of 32 codes at 3 bits, groups of 16 (2 per row): code (r + j) % 8, scale (g + 1) / 4 for the
    g-th group of the tensor (row-major), zero 3 -> w = (code - 3) * scale, exact in every float dtype here."""
    rows, length, group = 5, 32, 16
    codes = torch.tensor([[(r + j) % 8 for j in range(length)] for r in range(rows)], dtype=torch.uint8)
    scale = (torch.arange(rows * 2, dtype=torch.float32).reshape(rows, 2) + 1) / 4
    zero = torch.full((rows, 2), 3.0)
    want = [[((r + j) % 8 - 3) * (2 * r + j // group + 1) / 4 for j in range(length)] for r in range(rows)]
    return pack_codes(codes, 3), scale.half(), zero.half(), want


@pytest.mark.parametrize("chunk,rows_per_call", [(64, [2, 2, 1]), (96, [3, 2]), (16, [1, 1, 1, 1, 1]),
                                                 (1 << 22, [5])])
def test_dequantize_chunks(monkeypatch: pytest.MonkeyPatch, chunk: int, rows_per_call: list) -> None:
    """Rows are decoded max(1, CHUNK_ELEMENTS // 32) at a time, each exactly once, with their own scales."""
    packed, scale, zero, want = _dequant_case()
    seen: list = []
    real = intq.unpack_codes

    def recording(p: torch.Tensor, bits: int) -> torch.Tensor:
        seen.append(p.shape[0])
        return real(p, bits)

    monkeypatch.setattr(intq, "CHUNK_ELEMENTS", chunk)
    monkeypatch.setattr(intq, "unpack_codes", recording)
    out = dequantize_int(packed, scale, zero, 3, 16)
    assert out.tolist() == want
    assert seen == rows_per_call


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dequantize_output_dtype(dtype: torch.dtype) -> None:
    packed, scale, zero, want = _dequant_case()
    out = dequantize_int(packed.reshape(5, 1, 12), scale.reshape(5, 1, 2), zero.reshape(5, 1, 2), 3, 16, dtype=dtype)
    assert out.dtype == dtype and out.shape == (5, 1, 32)
    assert out.reshape(5, 32).tolist() == want


def test_quantize_then_dequantize_many_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same values whatever the chunking, with two groups of different scale in every row."""
    w = torch.tensor([[float(j % 8) if j < 16 else -2.0 * (j % 8) for j in range(32)]] * 3)
    monkeypatch.setattr(intq, "CHUNK_ELEMENTS", 32)
    p, s, z = quantize_int(w, 3, 16)
    # group [0..7] x2: scale 1, zero 0 (exact); group -2 * [0..7]: lo -14, scale 2, zero 7 (exact)
    assert s.tolist() == [[1.0, 2.0]] * 3 and z.tolist() == [[0.0, 7.0]] * 3
    assert math.isclose(float((dequantize_int(p, s, z, 3, 16) - w).abs().max()), 0.0)
