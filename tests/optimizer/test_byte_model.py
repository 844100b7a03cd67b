"""Byte model: hand-computed sizes, the published DeepSeek-V3 GGUF sizes, and table/scalar agreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizer.architectures import architecture_from_config, load_architecture
from optimizer.byte_model import (
    block_bytes,
    bytes_table,
    resolved_block_bytes,
    uniform_bytes,
    uniform_bytes_by_kind,
)
from optimizer.errors import InputError
from optimizer.formats import get_format, known_format_names
from optimizer.model_spec import Block, BlockKind

DATA = Path(__file__).resolve().parents[2] / "optimizer" / "data" / "deepseek_v3"


@pytest.fixture(scope="module")
def deepseek_v3():
    return load_architecture(DATA / "config_671B.json")


def _w(shape: tuple[int, ...]) -> Block:
    return Block("w", BlockKind.ATTENTION, shape)


def test_hand_computed_small_shape() -> None:
    b = _w((8, 256))
    assert block_bytes(b, "Q4_K") == 8 * 1 * 144  # 256-element super-blocks of 144 bytes
    assert block_bytes(b, "Q8_0") == 8 * 8 * 34  # 32-element blocks of 34 bytes
    assert block_bytes(b, "int4_g128") == 8 * (256 * 4 // 8 + 2 * 4)  # packed codes + fp16 scale/zero per group
    assert block_bytes(b, "BF16") == 8 * 256 * 2
    assert block_bytes(_w((5, 96)), "int3_g32") == 5 * (36 + 3 * 4)


def test_non_quantizable_costs_fixed_format() -> None:
    norm = Block("n", BlockKind.NORM, (64,), quantizable=False, fixed_format="F32")
    assert all(block_bytes(norm, f) == 256 for f in ("Q2_K", "Q8_0", "BF16", "int4_g128"))
    assert block_bytes(Block("r", BlockKind.ROUTER, (3, 7), quantizable=False, fixed_format="F32"), "Q4_K") == 84


def test_unfit_shape_raises_and_fallback_resolves() -> None:
    b = _w((3, 96))
    with pytest.raises(InputError, match="Q4_K cannot store shape"):
        block_bytes(b, "Q4_K")
    assert resolved_block_bytes(b, "Q4_K") == 3 * 3 * 22  # llama.cpp falls back to Q5_0
    assert resolved_block_bytes(b, "Q6_K") == 3 * 3 * 34  # ... and Q6_K to Q8_0
    with pytest.raises(InputError):
        block_bytes(b, "NOPE")


def test_deepseek_v3_uniform_sizes_match_published_gguf(deepseek_v3) -> None:
    q8 = uniform_bytes(deepseek_v3, "Q8_0")
    q6 = uniform_bytes(deepseek_v3, "Q6_K")
    assert abs(q8 - 713e9) <= 0.01 * 713e9, q8
    assert abs(q6 - 551e9) <= 0.01 * 551e9, q6
    by_kind = uniform_bytes_by_kind(deepseek_v3, "Q8_0")
    assert sum(by_kind.values()) == q8
    assert by_kind[BlockKind.NORM] == 4 * sum(b.numel for b in deepseek_v3.blocks_of_kind([BlockKind.NORM]))
    assert by_kind[BlockKind.ROUTED_EXPERT] > 0.95 * q8


def test_bytes_table_matches_uniform(deepseek_v3) -> None:
    formats = ["Q2_K", "Q4_K", "Q6_K", "Q8_0", "BF16", "int4_g128"]
    table = bytes_table(deepseek_v3, formats)
    assert table.shape == (len(deepseek_v3.blocks), len(formats)) and table.dtype == np.int64
    assert (table > 0).all()  # every DeepSeek-V3 row length divides 256
    assert int(table[:, formats.index("Q8_0")].sum()) == uniform_bytes(deepseek_v3, "Q8_0")


ODD = dict(  # head_dim 24 and expert width 96 do not divide into 256-element super-blocks
    model_type="qwen2_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=96,
    shared_expert_intermediate_size=160, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
    head_dim=24, vocab_size=1000, num_experts=4, num_experts_per_tok=2,
)


@pytest.mark.parametrize("fallback", [False, True])
def test_bytes_table_agrees_with_block_bytes(fallback: bool) -> None:
    arch = architecture_from_config(ODD)
    formats = ["Q4_K", "Q6_K", "Q8_0", "IQ2_XXS", "int4_g128", "int3_g32", "BF16"]
    table = bytes_table(arch, formats, fallback=fallback)
    scalar = resolved_block_bytes if fallback else block_bytes
    for i, block in enumerate(arch.blocks):
        for j, name in enumerate(formats):
            try:
                expected = scalar(block, name)
            except InputError:
                expected = -1
            assert table[i, j] == expected, (block.name, name)
    # rows of 96 (expert down_proj) do not fit Q4_K without llama.cpp's fallback; int formats never fall back
    assert (table[:, formats.index("Q4_K")] == -1).any() != fallback
    assert (table[:, formats.index("int4_g128")] == -1).any()


def test_uniform_bytes_applies_fallback() -> None:
    arch = architecture_from_config(ODD)
    for name in ("Q4_K", "Q6_K", "Q8_0", "BF16"):
        assert uniform_bytes(arch, name) == sum(resolved_block_bytes(b, name) for b in arch.blocks)
    with pytest.raises(InputError):
        uniform_bytes(arch, "int4_g128")  # an int format has no fallback for rows of 96


def test_bytes_table_unknown_format_is_an_error() -> None:
    with pytest.raises(InputError, match="unknown format"):
        bytes_table(architecture_from_config(ODD), ["Q4_K", "Q9_Z"])


def test_format_parts_are_the_one_storage_layout() -> None:
    """Format.parts: the tensors apply writes and quant produces; their bytes are exactly Format.nbytes."""
    # int4_g64, [3, 128]: codes 128 * 4 / 8 = 64 bytes a row, 2 groups of fp16 scale + zero: 3 * (64 + 8) = 216
    parts = get_format("int4_g64").parts((3, 128))
    assert [(p.suffix, p.dtype, p.shape) for p in parts] == [
        ("qcodes", "U8", (3, 64)), ("qscale", "F16", (3, 2)), ("qzero", "F16", (3, 2))]
    assert sum(p.nbytes for p in parts) == 216 == get_format("int4_g64").nbytes((3, 128))
    # int3_g32, [2, 96]: ceil(96 * 3 / 8) = 36 code bytes a row, 3 groups: 2 * (36 + 12) = 96
    assert [p.shape for p in get_format("int3_g32").parts((2, 96))] == [(2, 36), (2, 3), (2, 3)]
    # Q4_K, [4, 512]: 2 blocks of 144 bytes a row; BF16 is the tensor itself
    assert [(p.suffix, p.shape) for p in get_format("Q4_K").parts((4, 512))] == [("gguf", (4, 288))]
    assert [(p.suffix, p.dtype) for p in get_format("BF16").parts((4, 512))] == [("", "BF16")]
    for name in known_format_names():
        fmt = get_format(name)
        for shape in ((256,), (3, 512), (2, 4, 768)):
            if fmt.admits(shape):
                assert sum(p.nbytes for p in fmt.parts(shape)) == fmt.nbytes(shape), (name, shape)
    with pytest.raises(InputError, match="rows divisible by 64"):
        get_format("int4_g64").parts((3, 80))


def test_gguf_legacy_types_know_their_code_bits() -> None:
    assert {n: get_format(n).bits for n in ("Q4_0", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "BF16")} == {
        "Q4_0": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": None, "BF16": None}
