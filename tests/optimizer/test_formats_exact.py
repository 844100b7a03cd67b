"""Exact values of optimizer/formats.py: int-format block sizes and bits per weight by hand, byte counts and part
shapes that are ints (not merely equal floats), the empty shape, llama.cpp's fallback rule with its messages, and
the size order of format names."""
from __future__ import annotations

import pytest

from optimizer.errors import InputError
from optimizer.formats import (
    StoredPart,
    get_format,
    num_elements,
    num_rows,
    resolve_format,
    row_length,
    same_bits_stand_in,
    sort_by_size,
)


def _all_int(values) -> bool:
    return all(type(v) is int for v in values)


# ------------------------------------------------------------------------------------------------ int formats
@pytest.mark.parametrize("name,block_bytes,bits_per_weight", [
    # block_bytes = group * bits / 8 code bytes + 4 bytes of fp16 scale and zero; bpw = 8 * block_bytes / group
    ("int4_g32", 20.0, 5.0),      # 16 + 4 = 20;  160 / 32
    ("int3_g32", 16.0, 4.0),      # 12 + 4 = 16;  128 / 32
    ("int2_g128", 36.0, 2.25),    # 32 + 4 = 36;  288 / 128
    ("int8_g64", 68.0, 8.5),      # 64 + 4 = 68;  544 / 64
    ("int5_g32", 24.0, 6.0),      # 20 + 4 = 24;  192 / 32
    ("int7_g128", 116.0, 7.25),   # 112 + 4 = 116; 928 / 128
    ("int6_g8", 10.0, 10.0),      # 6 + 4 = 10;   80 / 8 (the smallest group)
])
def test_int_format_block_bytes_by_hand(name: str, block_bytes: float, bits_per_weight: float) -> None:
    fmt = get_format(name)
    assert fmt.block_bytes == block_bytes
    assert fmt.bits_per_weight == bits_per_weight
    assert fmt.family == "int" and fmt.quantized and fmt.name == name
    assert fmt.block_elements == int(name.split("_g")[1]) and fmt.bits == int(name[3])


# ------------------------------------------------------------------------------------------------ byte counts are ints
@pytest.mark.parametrize("name,shape,nbytes", [
    ("int4_g32", (3, 64), 3 * (32 + 2 * 4)),        # 120
    ("int3_g64", (2, 5, 128), 10 * (48 + 2 * 4)),   # 560
    ("int8_g128", (256,), 256 + 2 * 4),             # 264: a vector is one row
    ("Q4_K", (3, 512), 3 * 2 * 144),                # 864
    ("Q8_0", (2, 64), 2 * 2 * 34),                  # 136
    ("BF16", (4, 6), 4 * 6 * 2),                    # 48
    ("F32", (7,), 28),
])
def test_nbytes_is_an_exact_int(name: str, shape: tuple[int, ...], nbytes: int) -> None:
    got = get_format(name).nbytes(shape)
    assert got == nbytes and type(got) is int


def test_parts_shapes_are_ints() -> None:
    # int4_g32 on rows of 96: 96 * 4 / 8 = 48 code bytes and 96 / 32 = 3 groups per row
    parts = get_format("int4_g32").parts((2, 5, 96))
    assert [(p.suffix, p.dtype, p.shape) for p in parts] == [
        ("qcodes", "U8", (2, 5, 48)), ("qscale", "F16", (2, 5, 3)), ("qzero", "F16", (2, 5, 3))]
    assert all(_all_int(p.shape) for p in parts)
    assert [p.nbytes for p in parts] == [480, 60, 60] and sum(p.nbytes for p in parts) == 600
    # Q4_K on rows of 512: 2 super-blocks of 144 bytes = 288 bytes per row
    (gguf,) = get_format("Q4_K").parts((3, 512))
    assert (gguf.suffix, gguf.dtype, gguf.shape) == ("gguf", "U8", (3, 288)) and _all_int(gguf.shape)
    # Q8_0 on a vector of 64: 2 blocks of 34 bytes
    (q8,) = get_format("Q8_0").parts((64,))
    assert q8.shape == (68,) and _all_int(q8.shape) and q8.nbytes == 68
    # float formats keep the tensor as it is
    assert get_format("BF16").parts((4, 6)) == (StoredPart("", "BF16", (4, 6)),)


# ------------------------------------------------------------------------------------------------ shapes
def test_shape_helpers_on_every_rank() -> None:
    assert row_length(()) == 1 and num_rows(()) == 1 and num_elements(()) == 1  # a scalar is one row of one
    assert row_length((7,)) == 7 and num_rows((7,)) == 1 and num_elements((7,)) == 7
    assert row_length((3, 7)) == 7 and num_rows((3, 7)) == 3 and num_elements((3, 7)) == 21
    assert row_length((2, 3, 7)) == 7 and num_rows((2, 3, 7)) == 6 and num_elements((2, 3, 7)) == 42
    assert num_rows((0, 7)) == 0 and num_elements((0, 7)) == 0
    assert all(type(f(s)) is int for f in (row_length, num_rows, num_elements) for s in ((), (7,), (2, 3, 7)))


def test_scalar_tensor_costs_one_element() -> None:
    # shape (): one row of one element
    assert get_format("F16").nbytes(()) == 2 and get_format("F32").nbytes(()) == 4
    assert get_format("F32").admits(()) and not get_format("Q8_0").admits(())
    assert get_format("F16").parts(()) == (StoredPart("", "F16", ()),)
    assert StoredPart("", "F32", ()).nbytes == 4 and StoredPart("", "BF16", ()).nbytes == 2


def test_nbytes_refusal_message() -> None:
    with pytest.raises(InputError) as e:
        get_format("Q4_K").nbytes((2, 96))
    assert str(e.value) == "format Q4_K needs rows divisible by 256, but shape [2, 96] has rows of 96"
    with pytest.raises(InputError) as e:
        get_format("int4_g64").parts((96,))
    assert str(e.value) == "format int4_g64 needs rows divisible by 64, but shape [96] has rows of 96"


# ------------------------------------------------------------------------------------------------ resolve_format
def test_resolve_format_fallbacks() -> None:
    # rows of 96 fit 32-element blocks but not 256-element super-blocks: K-quants fall back
    assert resolve_format("Q4_K", (2, 96)).name == "Q5_0"
    assert resolve_format("Q6_K", (2, 96)).name == "Q8_0"
    assert resolve_format("IQ2_XXS", (2, 96)).name == "IQ4_NL"
    assert resolve_format("Q4_K", (2, 512)).name == "Q4_K"  # fits: kept
    assert resolve_format("int4_g32", (2, 96)).name == "int4_g32"


@pytest.mark.parametrize("name,shape,message", [
    # a fallback that does not fit either: rows of 48 are not a multiple of Q5_0's 32
    ("Q4_K", (2, 48), "no storage for shape [2, 48] in format Q4_K (row length 48)"),
    ("Q6_K", (48,), "no storage for shape [48] in format Q6_K (row length 48)"),
    # no fallback at all: a legacy type, and an int format
    ("Q4_0", (2, 48), "no storage for shape [2, 48] in format Q4_0 (row length 48)"),
    ("int4_g64", (3, 96), "no storage for shape [3, 96] in format int4_g64 (row length 96)"),
])
def test_resolve_format_refusals(name: str, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(InputError) as e:
        resolve_format(name, shape)
    assert str(e.value) == message


# ------------------------------------------------------------------------------------------------ sort_by_size
def test_sort_by_size_orders_by_bits_then_name() -> None:
    # bits per weight: Q4_0 18 * 8 / 32 = 4.5, Q4_K 144 * 8 / 256 = 4.5 (tie: by canonical name, Q4_0 < Q4_K),
    # int4_g32 5.0, Q8_0 34 * 8 / 32 = 8.5, BF16 16; duplicates collapse; the names come back as given
    names = ["Q8_0", "int4_g32", "Q4_K", "BF16", "q4_0", "Q4_K"]
    assert sort_by_size(names) == ["q4_0", "Q4_K", "int4_g32", "Q8_0", "BF16"]
    # the name breaks ties by the canonical (upper-case) name: IQ4_NL < Q4_0 at 4.5 bits; bits beat names
    assert sort_by_size(iter(["q4_0", "iq4_nl", "IQ2_XXS"])) == ["IQ2_XXS", "iq4_nl", "q4_0"]
    assert sort_by_size(["int8_g32", "int2_g32"]) == ["int2_g32", "int8_g32"]
    assert sort_by_size([]) == []


@pytest.mark.parametrize("name, admitted, expected", [
    ("int3_g64", ["int3_g64", "int3_g80", "BF16"], "int3_g64"),  # admitted: itself
    # a row of 80 takes int3 in its largest group: g80 (3.4 bits/weight) before g40 (3.8), not int4_g80
    ("int3_g64", ["int3_g40", "int3_g80", "int4_g80", "BF16"], "int3_g80"),
    ("int3_g64", ["int4_g80", "BF16"], None),  # no 3-bit candidate: the caller decides
    ("Q4_K", ["Q5_0", "BF16"], None),  # GGUF types fall back by llama.cpp's rule, not here
    ("BF16", ["BF16"], "BF16"),
])
def test_same_bits_stand_in(name: str, admitted: list[str], expected: str | None) -> None:
    assert same_bits_stand_in(name, admitted) == expected
