"""Exact bytes of optimizer/byte_model.py by hand: the bytes table (with and without llama.cpp's fallback), the
shape groups it is computed over, fixed formats, every refusal message, router rows of pruned plans.

Block sizes used below (ggml's tables): a 32-element block is 18 bytes in Q4_0, 22 in Q5_0, 34 in Q8_0; a
256-element super-block is 144 bytes in Q4_K; BF16/F16 are 2 bytes per element, F32 4; int4_g32 stores a row of
``r`` elements in ``r / 2`` code bytes plus 4 bytes per group of 32.
"""
from __future__ import annotations

import numpy as np
import pytest

from optimizer.byte_model import (
    _shape_groups,
    block_bytes,
    bytes_table,
    is_router_row_block,
    plan_bytes_by_kind,
    resolved_block_bytes,
    uniform_bytes,
    uniform_bytes_by_kind,
)
from optimizer.errors import InputError
from optimizer.model_spec import Architecture, Block, BlockKind, KVCacheSpec, MoELayer

A, N = BlockKind.ATTENTION, BlockKind.NORM


def _arch(blocks, moe_layers=()) -> Architecture:
    return Architecture(family="hand", num_layers=1, hidden_size=32, vocab_size=32, moe_layers=tuple(moe_layers),
                        shared_experts=0, blocks=tuple(blocks), kv_cache=KVCacheSpec("gqa", 2, 1))


BLOCKS = (
    Block("w.a", A, (2, 64)),                                        # quantizable
    Block("w.b", A, (2, 64), fixed_format="F16"),                    # quantizable: its fixed format is ignored
    Block("n.a", N, (8,), quantizable=False, fixed_format="F32"),    # 8 * 4 = 32 in every format
    Block("n.b", N, (8,), quantizable=False, fixed_format="F16"),    # 8 * 2 = 16 in every format
    Block("w.c", A, (3, 96)),                                        # rows of 96: no 256-element super-block fits
    Block("n.c", N, (8,), quantizable=False),                        # no fixed format: F32 by default, 32
)
FORMATS = ["Q4_0", "Q4_K", "BF16", "int4_g32"]


# ------------------------------------------------------------------------------------------------ shape groups
def test_shape_groups_by_hand() -> None:
    keys, index = _shape_groups(BLOCKS)
    # quantizable blocks group by shape alone (the fixed format of w.b plays no part); non-quantizable ones by
    # shape and fixed format, so F32, F16 and "no fixed format" are three groups of the same shape
    assert keys == [((2, 64), True, None), ((8,), False, "F32"), ((8,), False, "F16"), ((3, 96), True, None),
                    ((8,), False, None)]
    assert index.tolist() == [0, 0, 1, 2, 3, 4] and index.dtype == np.int64


# ------------------------------------------------------------------------------------------------ bytes table
def test_bytes_table_by_hand() -> None:
    table = bytes_table(_arch(BLOCKS), FORMATS)
    # (2, 64): Q4_0 2 rows * 2 blocks * 18 = 72; Q4_K none; BF16 2 * 64 * 2 = 256; int4_g32 2 * (32 + 2 * 4) = 80
    # (3, 96): Q4_0 3 * 3 * 18 = 162; Q4_K none; BF16 3 * 96 * 2 = 576; int4_g32 3 * (48 + 3 * 4) = 180
    assert table.dtype == np.int64 and table.shape == (6, 4)
    assert table.tolist() == [
        [72, -1, 256, 80],
        [72, -1, 256, 80],
        [32, 32, 32, 32],
        [16, 16, 16, 16],
        [162, -1, 576, 180],
        [32, 32, 32, 32],
    ]


def test_bytes_table_with_fallback_by_hand() -> None:
    # llama.cpp stores Q4_K as Q5_0 where 256 does not divide the rows: (2, 64) 2 * 2 * 22 = 88, (3, 96) 3 * 3 * 22
    table = bytes_table(_arch(BLOCKS), ["Q4_K", "Q6_K"], fallback=True)
    # Q6_K falls back to Q8_0: (2, 64) 2 * 2 * 34 = 136, (3, 96) 3 * 3 * 34 = 306
    assert table.tolist() == [[88, 136], [88, 136], [32, 32], [16, 16], [198, 306], [32, 32]]
    # a fallback that does not fit either (rows of 48 are no multiple of 32) is still -1
    assert bytes_table(_arch([Block("w", A, (1, 48))]), ["Q4_K", "BF16"], fallback=True).tolist() == [[-1, 96]]


def test_bytes_table_refusals() -> None:
    # an unknown format name is an error, not a column of -1
    with pytest.raises(InputError, match="unknown format 'Q9_9'"):
        bytes_table(_arch(BLOCKS), ["Q4_0", "Q9_9"])
    # a non-quantizable block whose fixed format cannot store it: the error is raised (the message names the
    # shape group, which is what the table is computed over)
    bad = _arch([Block("r", BlockKind.ROUTER, (3, 7), quantizable=False, fixed_format="Q8_0")])
    with pytest.raises(InputError) as e:
        bytes_table(bad, ["Q4_0"])
    assert str(e.value) == "block <shape>: fixed format Q8_0 cannot store shape [3, 7]"
    with pytest.raises(InputError) as e:
        bytes_table(bad, ["Q4_0"], fallback=True)
    assert str(e.value) == "block <shape>: fixed format Q8_0 cannot store shape [3, 7]"


# ------------------------------------------------------------------------------------------------ uniform bytes
def test_uniform_bytes_by_hand() -> None:
    arch = _arch(BLOCKS)
    # Q4_K (with fallback to Q5_0): 88 + 88 + 198 = 374 of attention; norms 32 + 16 + 32 = 80
    assert uniform_bytes_by_kind(arch, "Q4_K") == {A: 374, N: 80}
    assert uniform_bytes(arch, "Q4_K") == 454
    # Q4_0: 72 + 72 + 162 = 306 of attention
    assert uniform_bytes_by_kind(arch, "Q4_0") == {A: 306, N: 80}
    total = uniform_bytes(arch, "Q4_0")
    assert total == 386 and type(total) is int
    assert all(type(v) is int for v in uniform_bytes_by_kind(arch, "Q4_0").values())
    assert uniform_bytes(_arch([]), "Q4_0") == 0 and uniform_bytes_by_kind(_arch([]), "Q4_0") == {}
    with pytest.raises(InputError, match=r"no storage for shape \[1, 48\] in format Q4_K"):
        uniform_bytes(_arch([Block("w", A, (1, 48))]), "Q4_K")


# ------------------------------------------------------------------------------------------------ single blocks
def test_block_bytes_and_fixed_formats() -> None:
    w, wb, n_f32, n_f16, wc, n_default = BLOCKS
    assert block_bytes(w, "Q4_0") == 72 and block_bytes(wb, "Q4_0") == 72  # a quantizable block: the asked format
    assert block_bytes(w, "F32") == 2 * 64 * 4
    # non-quantizable: its fixed format, whatever is asked; F32 when it names none
    assert [block_bytes(b, f) for b in (n_f32, n_f16, n_default) for f in ("Q4_0", "BF16")] == [32, 32, 16, 16, 32, 32]
    assert [resolved_block_bytes(b, "Q4_K") for b in (n_f32, n_f16, n_default)] == [32, 16, 32]
    assert resolved_block_bytes(w, "Q4_K") == 88 and resolved_block_bytes(wc, "Q6_K") == 306
    assert resolved_block_bytes(w, "int4_g32") == 80 and block_bytes(wc, "int4_g32") == 180


def test_block_bytes_messages() -> None:
    with pytest.raises(InputError) as e:
        block_bytes(BLOCKS[4], "Q4_K")
    assert str(e.value) == "block w.c: format Q4_K cannot store shape [3, 96] (rows of 96 are not a multiple of 256)"
    with pytest.raises(InputError) as e:
        block_bytes(Block("v", A, (40,)), "q8_0")
    assert str(e.value) == "block v: format Q8_0 cannot store shape [40] (rows of 40 are not a multiple of 32)"
    router = Block("r", BlockKind.ROUTER, (3, 7), quantizable=False, fixed_format="Q8_0")
    for f in (block_bytes, resolved_block_bytes):
        with pytest.raises(InputError) as e:
            f(router, "BF16")
        assert str(e.value) == "block r: fixed format Q8_0 cannot store shape [3, 7]"
    with pytest.raises(InputError) as e:
        resolved_block_bytes(Block("w", A, (1, 48)), "Q4_K")
    assert str(e.value) == "no storage for shape [1, 48] in format Q4_K (row length 48)"


# ------------------------------------------------------------------------------------------------ plans
def _router(name: str, shape: tuple[int, ...], layer: int | None) -> Block:
    return Block(name, BlockKind.ROUTER, shape, layer, quantizable=False, fixed_format="F32")


def _expert(layer: int, e: int) -> str:
    return f"model.layers.{layer}.mlp.experts.{e}.down_proj.weight"


def _moe_plan_arch() -> Architecture:
    """Two MoE layers: layer 0 with 4 experts, layer 1 with 2; each expert one (1, 32) block."""
    blocks = [
        _router("model.layers.0.mlp.gate.weight", (4, 32), 0),               # F32 4 * 32 * 4 = 512, 128 a row
        _router("model.layers.0.mlp.gate.e_score_correction_bias", (4,), 0),  # F32 16, 4 a row
        _router("model.layers.0.mlp.shared_expert_gate.weight", (4, 32), 0),  # not per expert (Qwen): 512 always
    ]
    blocks += [Block(_expert(0, e), BlockKind.ROUTED_EXPERT, (1, 32), 0, e, "down_proj") for e in range(4)]
    blocks.append(_router("model.layers.1.mlp.gate.weight", (2, 32), 1))     # 256
    blocks += [Block(_expert(1, e), BlockKind.ROUTED_EXPERT, (1, 32), 1, e, "down_proj") for e in range(2)]
    blocks.append(Block("model.norm.weight", N, (8,), quantizable=False, fixed_format="F32"))  # 32
    return _arch(blocks, (MoELayer(0, 4, 2), MoELayer(1, 2, 1)))


def test_plan_bytes_by_kind_by_hand() -> None:
    arch = _moe_plan_arch()
    # experts in Q8_0 (34) except layer 0's expert 2 in Q4_0 (18)
    formats = {_expert(0, e): "Q8_0" for e in range(4)} | {_expert(1, e): "Q8_0" for e in range(2)}
    formats[_expert(0, 2)] = "Q4_0"
    # keep experts 2 and 0 of layer 0 (given unordered, as numpy ints); layer 1 absent: keeps both
    got = plan_bytes_by_kind(arch, {0: [np.int64(2), np.int64(0)]}, formats)
    # routed: 18 + 34 (layer 0) + 2 * 34 (layer 1) = 120; router: 512 // 4 * 2 = 256, bias 16 // 4 * 2 = 8,
    # shared-expert gate 512 (not sliced), layer 1 router 256 (not in kept): 1032
    assert got == {"router": 1032, "routed_expert": 120, "norm": 32}
    assert all(type(v) is int for v in got.values())
    # layer 1 keeps 1 of 2 (its router 256 // 2 * 1 = 128); layer 0 keeps all 4 explicitly (rows stay 512, 16)
    got = plan_bytes_by_kind(arch, {0: [0, 1, 2, 3], 1: [1]}, formats)
    assert got == {"router": 512 + 16 + 512 + 128, "routed_expert": 3 * 34 + 18 + 34, "norm": 32}
    # nothing kept in layer 1: no router rows, no experts
    got = plan_bytes_by_kind(arch, {1: []}, formats)
    assert got == {"router": 512 + 16 + 512, "routed_expert": 3 * 34 + 18, "norm": 32}
    # nothing pruned anywhere
    assert plan_bytes_by_kind(arch, {}, formats) == {"router": 1296, "routed_expert": 5 * 34 + 18, "norm": 32}


def test_plan_bytes_by_kind_formats_and_messages() -> None:
    arch = _moe_plan_arch()
    formats = {_expert(0, e): "Q8_0" for e in range(4)} | {_expert(1, e): "Q8_0" for e in range(2)}
    # a pruned expert needs no format; a kept one does
    del formats[_expert(0, 3)]
    assert plan_bytes_by_kind(arch, {0: [0, 1, 2]}, formats)["routed_expert"] == 5 * 34
    with pytest.raises(InputError) as e:
        plan_bytes_by_kind(arch, {0: [0, 3]}, formats)
    assert str(e.value) == f"plan.formats: no format for {_expert(0, 3)}"
    # a non-quantizable block may be given a format: it still costs its fixed format
    formats[_expert(0, 3)] = "Q8_0"
    assert plan_bytes_by_kind(arch, {}, {**formats, "model.norm.weight": "Q4_0"})["norm"] == 32
    # a quantizable block's fixed_format is no default
    arch2 = _arch([Block("w", A, (1, 32), fixed_format="F32")])
    with pytest.raises(InputError, match="^plan.formats: no format for w$"):
        plan_bytes_by_kind(arch2, {}, {})
    assert plan_bytes_by_kind(arch2, {}, {"w": "Q4_0"}) == {"attention": 18}


@pytest.mark.parametrize("block,expected", [
    (_router("model.layers.0.mlp.gate.weight", (4, 32), 0), True),
    (_router("model.layers.0.mlp.gate.e_score_correction_bias", (4,), 0), True),  # 1-D: one entry an expert
    (_router("model.layers.0.mlp.shared_expert_gate.weight", (4, 32), 0), False),
    (_router("model.layers.0.mlp.gate.weight", (32, 4), 0), False),  # columns do not count
    (_router("model.layers.0.mlp.gate.weight", (), 0), False),       # a scalar has no rows
    (_router("gate.weight", (4, 32), None), False),                  # no layer
    (_router("model.layers.2.mlp.gate.weight", (4, 32), 2), False),  # not an MoE layer
    (Block("model.layers.0.x", A, (4, 32), 0), False),               # 4 rows, but not a router
])
def test_is_router_row_block_cases(block: Block, expected: bool) -> None:
    assert is_router_row_block(block, {0: 4, 1: 2}) is expected
