"""runtime.quant.intq against hand-computed golden values: packed bytes, RTN parameters and codes, HQQ >= RTN.

Layout (module docstring): code j of a row occupies bits [j*b, (j+1)*b) of the row's little-endian bit string;
w = (q - zero) * scale with one fp16 scale and zero per group.
"""
from __future__ import annotations

import pytest
import torch

from runtime.quant import intq
from runtime.quant.intq import dequantize_int, pack_codes, quantize_int, unpack_codes

U8 = torch.uint8


def _bytes(t: torch.Tensor) -> list:
    return t.reshape(-1).tolist()


# codes, bits, packed bytes (arithmetic in the comments)
GOLDEN_PACK = [
    # 2 bits, 4 codes a byte, first code in the lowest bits:
    #   byte 0 = 0 | 1 << 2 | 2 << 4 | 3 << 6 = 0 + 4 + 32 + 192 = 228 (0xE4)
    #   byte 1 = 3 | 2 << 2 | 1 << 4 | 0 << 6 = 3 + 8 + 16 = 27 (0x1B)
    ([0, 1, 2, 3, 3, 2, 1, 0], 2, [228, 27]),
    # 3 bits: value = 1 + 2 << 3 + 3 << 6 + 4 << 9 + 5 << 12 + 6 << 15 + 7 << 18 + 0 << 21
    #               = 1 + 16 + 192 + 2048 + 20480 + 196608 + 1835008 = 2054353 = 0x1F58D1 -> D1 58 1F
    #   (byte 0 = 001 | 010 << 3 | (011 & 3) << 6 = 1 + 16 + 192 = 209)
    ([1, 2, 3, 4, 5, 6, 7, 0], 3, [0xD1, 0x58, 0x1F]),
    # 4 bits: byte k = code[2k] | code[2k+1] << 4: 0x21, 0x43, 0x65, 0x87
    ([1, 2, 3, 4, 5, 6, 7, 8], 4, [0x21, 0x43, 0x65, 0x87]),
    # 5 bits: value = 31 + 0 << 5 + 1 << 10 + 2 << 15 + 4 << 20 + 8 << 25 + 16 << 30 + 0 << 35
    #               = 0x1F + 0x400 + 0x1_0000 + 0x40_0000 + 0x1000_0000 + 0x4_0000_0000 = 0x4_1041_041F
    ([31, 0, 1, 2, 4, 8, 16, 0], 5, [0x1F, 0x04, 0x41, 0x10, 0x04]),
    # 8 bits: the codes themselves
    ([255, 0, 1, 128, 7, 9, 254, 3], 8, [255, 0, 1, 128, 7, 9, 254, 3]),
]


@pytest.mark.parametrize("codes,bits,packed", GOLDEN_PACK)
def test_pack_golden_bytes(codes: list, bits: int, packed: list) -> None:
    c = torch.tensor(codes, dtype=U8)
    assert _bytes(pack_codes(c, bits)) == packed
    assert _bytes(unpack_codes(torch.tensor(packed, dtype=U8), bits)) == codes


def test_pack_rows_are_independent_and_leading_dims_kept() -> None:
    # rows [3, 3, 3, 3, 0, 0, 0, 0] and [0, 0, 0, 0, 3, 3, 3, 3] at 2 bits: [0xFF, 0x00] and [0x00, 0xFF]
    c = torch.tensor([[[3, 3, 3, 3, 0, 0, 0, 0], [0, 0, 0, 0, 3, 3, 3, 3]]], dtype=U8)
    p = pack_codes(c, 2)
    assert p.shape == (1, 2, 2) and p.tolist() == [[[0xFF, 0x00], [0x00, 0xFF]]]
    assert torch.equal(unpack_codes(p, 2), c)
    # 16 codes at 4 bits in one row: two 8-code words one after the other
    row = torch.tensor([list(range(16))], dtype=U8)
    assert pack_codes(row, 4).tolist() == [[0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]]


# One group of 8 (group size 8 is the smallest allowed), weights, bits -> (scale, zero, codes, packed bytes)
GOLDEN_RTN = [
    # all positive: the range is widened to include 0 -> lo = 0, hi = 6, scale = 6 / 3 = 2, zero = 0
    # codes = round(w / 2) = round([.25, .45, 1.05, 1.6, 2.1, 3, 2.55, .6]) = [0, 0, 1, 2, 2, 3, 3, 1]
    # bytes: 0 | 0 << 2 | 1 << 4 | 2 << 6 = 144; 2 | 3 << 2 | 3 << 4 | 1 << 6 = 2 + 12 + 48 + 64 = 126
    ([0.5, 0.9, 2.1, 3.2, 4.2, 6.0, 5.1, 1.2], 2, 2.0, 0.0, [0, 0, 1, 2, 2, 3, 3, 1], [144, 126]),
    # all negative: hi widened to 0 -> lo = -6, scale 2, zero = round(6 / 2) = 3
    # codes = round(3 + w / 2) = round([2.75, 2.55, 1.95, 1.4, .9, 0, .45, 2.4]) = [3, 3, 2, 1, 1, 0, 0, 2]
    # bytes: 3 | 3 << 2 | 2 << 4 | 1 << 6 = 111; 1 | 0 | 0 | 2 << 6 = 129
    ([-0.5, -0.9, -2.1, -3.2, -4.2, -6.0, -5.1, -1.2], 2, 2.0, 3.0, [3, 3, 2, 1, 1, 0, 0, 2], [111, 129]),
    # beyond fp16: (1e6 + 1e6) / 3 clamps to the fp16 maximum 65504; zero = round(1e6 / 65504) = 15 -> clamped to 3;
    # codes round(w / 65504 + 3): -12.3 -> 0 (clamped), 3, ..., 18.3 -> 3 (clamped)
    # bytes: 0 | 3 << 2 | 3 << 4 | 3 << 6 = 252; 255
    ([-1e6, 0, 0, 0, 0, 0, 0, 1e6], 2, 65504.0, 3.0, [0, 3, 3, 3, 3, 3, 3, 3], [252, 255]),
    # 4 bits: lo = -1.5, hi = 6, scale = 7.5 / 15 = 0.5, zero = round(1.5 / 0.5) = 3
    # codes = round(w / 0.5 + 3) = [0, 1, 3, 5, 6, 9, round(7.4) = 7, 15]
    # bytes: 0 | 1 << 4 = 16; 3 | 5 << 4 = 83; 6 | 9 << 4 = 150; 7 | 15 << 4 = 247
    ([-1.5, -1.0, 0.0, 1.0, 1.5, 3.0, 2.2, 6.0], 4, 0.5, 3.0, [0, 1, 3, 5, 6, 9, 7, 15], [16, 83, 150, 247]),
]


@pytest.mark.parametrize("w,bits,scale,zero,codes,packed", GOLDEN_RTN)
def test_rtn_golden(w: list, bits: int, scale: float, zero: float, codes: list, packed: list) -> None:
    weight = torch.tensor([w])
    p, s, z = quantize_int(weight, bits, 8, "rtn")
    assert s.dtype == torch.float16 and z.dtype == torch.float16
    assert s.tolist() == [[scale]] and z.tolist() == [[zero]]
    assert p.tolist() == [packed]
    assert unpack_codes(p, bits).tolist() == [codes]
    deq = dequantize_int(p, s, z, bits, 8)
    assert deq.tolist() == [[(c - zero) * scale for c in codes]]


def test_rtn_all_zero_group_gets_the_smallest_scale() -> None:
    # hi - lo = 0: the scale is clamped to the smallest fp16 subnormal 2^-24 (never 0: no 0 / 0)
    p, s, z = quantize_int(torch.zeros(1, 8), 3, 8, "rtn")
    assert s.tolist() == [[2.0 ** -24]] and z.tolist() == [[0.0]] and p.tolist() == [[0, 0, 0]]
    assert torch.equal(dequantize_int(p, s, z, 3, 8), torch.zeros(1, 8))


def test_rtn_two_groups_per_row() -> None:
    # row of 16 in groups of 8: [0..7] -> scale 7 / 3 (fp16), zero 0; [-8..-1] -> lo = -8, hi = 0 (widened)
    w = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1]], dtype=torch.float32)
    p, s, z = quantize_int(w, 2, 8, "rtn")
    s1 = float(torch.tensor(7 / 3).half())
    s2 = float(torch.tensor(8 / 3).half())
    assert s.tolist() == [[s1, s2]] and z.tolist() == [[0.0, 3.0]]  # zero = round(8 / (8/3)) = 3
    assert p.shape == (1, 4)


def _group_sq_errors(w: torch.Tensor, method: str, bits: int, group: int) -> torch.Tensor:
    p, s, z = quantize_int(w, bits, group, method)
    return ((dequantize_int(p, s, z, bits, group) - w) ** 2).reshape(-1, group).sum(1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hqq_is_never_worse_than_rtn_per_group(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 64, generator=g) * 0.02
    w = torch.where(torch.rand(48, 64, generator=g) < 0.03, w * 30, w)  # outliers: RTN's range is wasted
    rtn = _group_sq_errors(w, "rtn", bits, 32)
    hqq = _group_sq_errors(w, "hqq", bits, 32)
    assert bool((hqq <= rtn * (1 + 1e-6)).all()), (hqq - rtn).max()
    assert int((hqq < 0.99 * rtn).sum()) >= len(rtn) // 4  # and really better on many groups


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_chunked_equals_unchunked(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """Rows are processed CHUNK_ELEMENTS weights at a time: a tiny chunk (2 rows rtn, 1 row hqq, odd count of
    rows) must give exactly the whole-tensor result."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(2, 7, 32, generator=g)
    whole = quantize_int(w, 3, 32, method)
    deq_whole = dequantize_int(*whole, 3, 32)
    monkeypatch.setattr(intq, "CHUNK_ELEMENTS", 64)
    chunked = quantize_int(w, 3, 32, method)
    for a, b in zip(whole, chunked):
        assert a.shape == b.shape and torch.equal(a, b)
    assert whole[0].shape == (2, 7, 12) and whole[1].shape == (2, 7, 1)
    assert torch.equal(dequantize_int(*chunked, 3, 32), deq_whole)
    monkeypatch.setattr(intq, "CHUNK_ELEMENTS", 96)  # 3 rows a chunk in dequantize
    assert torch.equal(dequantize_int(*chunked, 3, 32), deq_whole)
