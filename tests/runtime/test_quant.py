"""runtime.quant: exact bytes, round trips, error ordering, GGUF handling."""
from __future__ import annotations

import logging

import pytest
import torch

from optimizer.errors import InputError
from optimizer.formats import get_format
from runtime.quant import fake_quantize, quantize, storage_format
from runtime.quant.intq import pack_codes, unpack_codes


def _weights(rows: int = 64, cols: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    outliers = torch.rand(rows, cols, generator=g) < 0.01
    return torch.where(outliers, w * 25, w)


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_roundtrip(bits: int) -> None:
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits), codes)


@pytest.mark.parametrize("name", ["int2_g32", "int3_g32", "int4_g64", "int5_g128", "int6_g32", "int7_g64",
                                  "int8_g128", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "BF16", "F16", "F32"])
@pytest.mark.parametrize("shape", [(64, 256), (3, 32, 256)])
def test_exact_bytes(name: str, shape: tuple[int, ...]) -> None:
    w = torch.randn(*shape)
    for method in ("rtn", "hqq"):
        qt = quantize(w, name, method)
        assert qt.nbytes == get_format(name).nbytes(shape)
        assert qt.dequantize().shape == w.shape


def test_error_decreases_with_bits_and_hqq_beats_rtn() -> None:
    w = _weights()
    errs = {}
    for method in ("rtn", "hqq"):
        errs[method] = [float(((fake_quantize(w, f"int{b}_g32", method) - w) ** 2).mean()) for b in range(2, 9)]
        assert all(a > b for a, b in zip(errs[method], errs[method][1:])), errs[method]
    assert all(h <= r for h, r in zip(errs["hqq"], errs["rtn"])), errs
    assert errs["hqq"][2] < 0.95 * errs["rtn"][2]  # a real gain at 4 bits on outlier-heavy weights


def test_fake_quantize_fused_is_per_expert() -> None:
    w = torch.randn(4, 48, 64)
    fused = fake_quantize(w, "int3_g32", "hqq")
    for e in range(4):
        assert torch.equal(fused[e], fake_quantize(w[e], "int3_g32", "hqq"))
    assert fused.dtype == w.dtype and fused.shape == w.shape


def test_rtn_int8_is_near_lossless_and_deterministic() -> None:
    w = _weights(seed=3)
    a, b = quantize(w, "int8_g32"), quantize(w, "int8_g32")
    assert all(torch.equal(a.parts[k], b.parts[k]) for k in a.parts)
    assert float((a.dequantize() - w).abs().max()) < 0.01 * float(w.abs().max())


def test_gguf_native_and_mapped(caplog: pytest.LogCaptureFixture) -> None:
    w = _weights(8, 256)
    q8 = quantize(w, "Q8_0")
    assert q8.format == "Q8_0" and "gguf" in q8.parts
    assert float(((q8.dequantize() - w) ** 2).mean()) < float(((fake_quantize(w, "Q4_0") - w) ** 2).mean())
    assert storage_format("Q4_K", (8, 256)) [0] == "int4_g64"
    assert storage_format("Q6_K", (8, 256))[0] == "int6_g32"
    assert storage_format("Q2_K", (8, 256))[0] == "int2_g32"
    for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ4_XS"):
        stored = get_format(storage_format(name, (8, 256))[0])
        assert stored.nbytes((8, 256)) >= get_format(name).nbytes((8, 256))
    with caplog.at_level(logging.WARNING):
        qt = quantize(w, "Q3_K")
    assert qt.format == "int3_g64" and qt.requested == "Q3_K"
    assert any("Q3_K" in r.message and "int3_g64" in r.message for r in caplog.records)


def test_bad_inputs() -> None:
    with pytest.raises(InputError):
        quantize(torch.randn(4, 48), "int4_g32")  # rows of 48 do not split into groups of 32
    with pytest.raises(InputError):
        quantize(torch.randn(4, 64), "int4_g32", method="gptq")
    with pytest.raises(InputError):
        quantize(torch.randn(4, 64), "nope")
