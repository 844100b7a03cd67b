"""Exact byte counts: budget sizes with every unit, the reserves, and the formats' and byte model's bytes by hand."""
from __future__ import annotations

import pytest

from optimizer.budget import DEFAULT_CONTEXT, MAX_BYTES, MAX_CONTEXT, make_budget, parse_bytes
from optimizer.byte_model import block_bytes, plan_bytes_by_kind
from optimizer.errors import InputError
from optimizer.formats import get_format
from optimizer.model_spec import Block, BlockKind
from optimizer.synthetic import synthetic_architecture

# ------------------------------------------------------------------------------------------------ parse_bytes
UNITS = [
    ("3", 3), ("3B", 3), ("3b", 3),
    ("3KB", 3_000), ("3MB", 3_000_000), ("3GB", 3_000_000_000), ("3TB", 3_000_000_000_000),
    ("3KiB", 3 * 1024), ("3MiB", 3 * 1_048_576), ("3GiB", 3 * 1_073_741_824), ("3TiB", 3 * 1_099_511_627_776),
    ("3kb", 3_000), ("3gib", 3_221_225_472), ("3GIB", 3_221_225_472), ("3gIb", 3_221_225_472),
    (" 3 GiB ", 3_221_225_472), ("1.5GiB", 1_610_612_736), ("0.5KB", 500), ("1e3MB", 10**9),
    ("2.5e-3GB", 2_500_000), ("120GiB", 128_849_018_880), ("128GB", 128_000_000_000),
    ("5000000001B", 5_000_000_001), ("1048576TiB", 2**60),
]


@pytest.mark.parametrize("text,expected", UNITS)
def test_every_unit_exactly(text: str, expected: int) -> None:
    got = parse_bytes(text)
    assert got == expected and isinstance(got, int)


def test_numbers_and_refusals() -> None:
    assert parse_bytes(5) == 5 and parse_bytes(2.5e9) == 2_500_000_000 and parse_bytes(MAX_BYTES) == 2**60
    for bad, message in (("3XB", "unknown unit 'xb'"), ("3GiBs", "unknown unit"), ("3 G B", "cannot read"),
                         ("GiB", "cannot read"), ("-1GB", "cannot read"), ("", "cannot read"),
                         (True, "expected a size"), (None, "expected a size"), ("nan", "cannot read"),
                         (float("nan"), "expected a size"), ("1048577TiB", "more than the limit"),
                         (2**60 + 1, "more than the limit"), ("1e400GB", "more than the limit"),
                         ("0", "must be positive"), ("0.4", "must be positive"), ("0GiB", "must be positive")):
        with pytest.raises(InputError, match=message):
            parse_bytes(bad, "--budget")
    assert parse_bytes("0GiB", "--overhead", minimum=0) == 0
    assert parse_bytes("1KiB", minimum=1024) == 1024
    with pytest.raises(InputError, match=">= 1025 bytes"):
        parse_bytes("1KiB", minimum=1025)


# ------------------------------------------------------------------------------------------------ make_budget
def _arch():
    # gqa KV cache: 2 * hidden = 64 elements per token and layer, 2 layers, 2 bytes: 256 bytes per token
    return synthetic_architecture(num_layers=2, num_experts=4, top_k=2, hidden=32, expert_inter=32, dense_inter=32,
                                  vocab=32)


def test_reserves_by_hand() -> None:
    arch = _arch()
    b = make_budget(arch, "1GiB", context=1000, overhead="1MiB")
    # KV 1000 * 256 = 256,000; overhead 1,048,576; available 1,073,741,824 - 256,000 - 1,048,576 = 1,072,437,248
    assert b.total == 1_073_741_824
    assert b.reserves == {"kv_cache": 256_000, "overhead": 1_048_576}
    assert b.available == 1_072_437_248
    # defaults: 8192 tokens (2,097,152 bytes of KV cache) and 2 GiB overhead
    d = make_budget(arch, "3GiB")
    assert DEFAULT_CONTEXT == 8192
    assert d.reserves == {"kv_cache": 8192 * 256, "overhead": 2 * 1_073_741_824}
    assert d.available == 3 * 1_073_741_824 - 2_097_152 - 2_147_483_648
    with pytest.raises(InputError, match="leaves nothing for weights"):
        make_budget(arch, "2GiB")  # the overhead alone takes it all
    # a context of 0 reserves nothing; the largest context is allowed
    assert make_budget(arch, 10_000, context=0, overhead=0).reserves == {"kv_cache": 0, "overhead": 0}
    assert make_budget(arch, "1TiB", context=MAX_CONTEXT, overhead=0).reserves["kv_cache"] == MAX_CONTEXT * 256


def test_zero_bytes_left_for_weights_is_refused() -> None:
    arch = _arch()
    # KV 100 * 256 = 25,600 + overhead 1,000 = 26,600: a budget of 26,600 leaves 0 bytes, 26,601 leaves 1
    with pytest.raises(InputError, match=r"--budget: .* leaves nothing for weights after reserves"):
        make_budget(arch, 26_600, context=100, overhead=1_000)
    with pytest.raises(InputError, match="leaves nothing for weights"):
        make_budget(arch, "26599B", context=100, overhead="1KB")
    assert make_budget(arch, "26601B", context=100, overhead="1KB").available == 1


def test_bad_context_and_overhead_are_refused() -> None:
    arch = _arch()
    for bad in (-1, -8192, MAX_CONTEXT + 1, True, 8.0, "8192", None):
        with pytest.raises(InputError, match=r"--context: expected a number of tokens in \[0, 2147483647\]"):
            make_budget(arch, "1TB", context=bad)
    with pytest.raises(InputError, match="--overhead"):
        make_budget(arch, "1TB", overhead="-1GB")
    with pytest.raises(InputError, match="--budget"):
        make_budget(arch, "0GB")


def test_mla_and_gqa_kv_cache_bytes() -> None:
    from optimizer.architectures import architecture_from_config
    from runtime.tiny_models import tiny_config

    # DeepSeek-V3 (MLA): kv_lora_rank 8 + qk_rope_head_dim 8 = 16 elements, 3 layers, 2 bytes: 96 bytes a token
    mla = architecture_from_config(tiny_config("deepseek_v3").to_dict())
    assert make_budget(mla, "1MB", context=100, overhead=0).reserves["kv_cache"] == 9_600
    # Qwen3-MoE (GQA): 2 * 2 kv heads * head_dim 8 = 32 elements, 3 layers, 2 bytes: 192 bytes a token
    gqa = architecture_from_config(tiny_config("qwen3_moe").to_dict())
    assert make_budget(gqa, "1MB", context=100, overhead=0).reserves["kv_cache"] == 19_200


# ------------------------------------------------------------------------------------------------ formats
# shape (2, 512): 2 rows of 512 -> bytes = 2 * (512 / block_elements) * block_bytes (ggml's block sizes)
GGUF_2x512 = {
    "Q4_0": 2 * 16 * 18, "Q5_0": 2 * 16 * 22, "Q5_1": 2 * 16 * 24, "Q8_0": 2 * 16 * 34, "IQ4_NL": 2 * 16 * 18,
    "Q2_K": 2 * 2 * 84, "Q3_K": 2 * 2 * 110, "Q4_K": 2 * 2 * 144, "Q5_K": 2 * 2 * 176, "Q6_K": 2 * 2 * 210,
    "IQ1_S": 2 * 2 * 50, "IQ1_M": 2 * 2 * 56, "IQ2_XXS": 2 * 2 * 66, "IQ2_XS": 2 * 2 * 74, "IQ2_S": 2 * 2 * 82,
    "IQ3_XXS": 2 * 2 * 98, "IQ3_S": 2 * 2 * 110, "IQ4_XS": 2 * 2 * 136,
    "F16": 2 * 512 * 2, "BF16": 2 * 512 * 2, "F32": 2 * 512 * 4,
}


@pytest.mark.parametrize("name", sorted(GGUF_2x512))
def test_gguf_bytes_by_hand(name: str) -> None:
    fmt = get_format(name)
    assert fmt.nbytes((2, 512)) == GGUF_2x512[name]
    assert fmt.nbytes((512,)) == GGUF_2x512[name] // 2  # a vector is one row
    assert fmt.nbytes((3, 2, 512)) == 3 * GGUF_2x512[name]  # rows are every leading index
    assert sum(p.nbytes for p in fmt.parts((2, 512))) == GGUF_2x512[name]


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int_bytes_by_hand(bits: int, group: int) -> None:
    # rows of 128: 128 * bits / 8 = 16 * bits code bytes, 128 / group groups of fp16 scale + fp16 zero (4 bytes)
    fmt = get_format(f"int{bits}_g{group}")
    per_row = 16 * bits + (128 // group) * 4
    assert fmt.nbytes((3, 128)) == 3 * per_row
    assert fmt.nbytes((128,)) == per_row
    assert fmt.nbytes((2, 5, 128)) == 10 * per_row
    assert fmt.bits_per_weight == pytest.approx(8 * (group * bits / 8 + 4) / group)
    assert [(p.suffix, p.dtype, p.shape) for p in fmt.parts((3, 128))] == [
        ("qcodes", "U8", (3, 16 * bits)), ("qscale", "F16", (3, 128 // group)), ("qzero", "F16", (3, 128 // group))]


def test_format_spot_values() -> None:
    assert get_format("int4_g32").nbytes((3, 64)) == 3 * (32 + 2 * 4) == 120
    assert get_format("int3_g32").nbytes((1, 32)) == 12 + 4 == 16
    assert get_format("int8_g128").nbytes((256,)) == 256 + 2 * 4 == 264
    assert get_format("int5_g8").nbytes((2, 16)) == 2 * (10 + 2 * 4) == 36  # groups of 8 (smallest allowed)
    assert get_format("Q4_K").bits_per_weight == 4.5 and get_format("Q8_0").bits_per_weight == 8.5
    assert get_format("int4_g32").bits_per_weight == 5.0 and get_format("int3_g128").bits_per_weight == 3.25
    assert get_format("BF16").bits_per_weight == 16.0 and not get_format("BF16").quantized
    assert get_format("q4_k").name == "Q4_K"  # GGUF names are case-insensitive
    assert not get_format("Q4_K").admits((2, 96)) and get_format("int4_g32").admits((2, 96))
    assert not get_format("int4_g64").admits((2, 96))
    with pytest.raises(InputError, match="rows divisible by 256"):
        get_format("Q4_K").nbytes((2, 96))
    for bad in ("int4_g4", "int4_g12", "int4_g0"):
        with pytest.raises(InputError, match="positive multiple of 8"):
            get_format(bad)
    for bad in ("int1_g32", "int9_g32", "Q4_Z", "int4_g32x", "int4_g32_g64"):
        with pytest.raises(InputError, match="unknown format"):
            get_format(bad)


# ------------------------------------------------------------------------------------------------ byte model
def test_plan_bytes_by_kind_by_hand() -> None:
    """hidden 32: every (32, 32) matrix is 640 bytes in int4_g32 (32 rows * (16 + 4)) and 2048 in BF16."""
    arch = _arch()
    formats = {b.name: "int4_g32" for b in arch.blocks if b.quantizable}
    for proj in ("gate_proj", "up_proj", "down_proj"):
        formats[f"model.layers.1.mlp.experts.2.{proj}.weight"] = "BF16"
    assert block_bytes(arch.blocks[0], "int4_g32") == 640
    by_kind = plan_bytes_by_kind(arch, {1: [2, 0]}, formats)  # experts 1 and 3 pruned (their formats ignored)
    assert by_kind == {
        "embedding": 640,
        "norm": 5 * 32 * 4,  # 2 per layer + the final norm, F32
        "attention": 2 * 4 * 640,
        "dense_mlp": 3 * 640,
        "router": 4 * 32 * 4 // 4 * 2,  # F32 [4, 32] = 512 bytes, 2 of its 4 rows kept
        "routed_expert": 3 * 640 + 3 * 2048,  # expert 0 int4, expert 2 BF16
        "shared_expert": 3 * 640,
        "lm_head": 640,
    }
    everything = plan_bytes_by_kind(arch, {}, formats)  # a layer not in kept keeps all its experts, all rows
    assert everything["router"] == 512 and everything["routed_expert"] == 3 * 640 * 3 + 3 * 2048
    # a kept expert without a format, and a format that cannot store the block, are errors
    missing = {k: v for k, v in formats.items() if k != "model.layers.1.mlp.experts.0.up_proj.weight"}
    with pytest.raises(InputError, match="no format for model.layers.1.mlp.experts.0.up_proj.weight"):
        plan_bytes_by_kind(arch, {1: [0]}, missing)
    assert plan_bytes_by_kind(arch, {1: [2]}, missing)["routed_expert"] == 3 * 2048  # pruned: not needed
    with pytest.raises(InputError, match="cannot store shape"):
        plan_bytes_by_kind(arch, {}, {**formats, "lm_head.weight": "Q4_K"})


def test_fixed_blocks_ignore_the_asked_format() -> None:
    norm = Block("n", BlockKind.NORM, (32,), quantizable=False, fixed_format="F32")
    router = Block("r", BlockKind.ROUTER, (4, 32), quantizable=False, fixed_format="BF16")
    assert {block_bytes(norm, f) for f in ("Q4_K", "int2_g32", "BF16")} == {128}
    assert {block_bytes(router, f) for f in ("Q8_0", "F32")} == {256}
