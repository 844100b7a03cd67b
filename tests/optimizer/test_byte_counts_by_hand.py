"""Hand-computed checks that kill the surviving mutants of optimizer/budget.py and optimizer/byte_model.py.

Byte sizes used below (ggml / plain dtypes): a [1, 32] row is 18 bytes in Q4_0 and 34 bytes in Q8_0
(one 32-element block); F32 is 4 bytes per element and F16 2 bytes per element.
"""

from __future__ import annotations

import pytest

from optimizer.budget import format_bytes, make_budget
from optimizer.byte_model import is_router_row_block, plan_bytes_by_kind, uniform_bytes, uniform_bytes_by_kind
from optimizer.errors import InputError
from optimizer.model_spec import Architecture, Block, BlockKind, KVCacheSpec, MoELayer


# ------------------------------------------------------------------------------------------- budget.py
@pytest.mark.parametrize(("n", "text"), [
    (1e12, "1.00 TB"),  # exactly at each scale: ">=" (not ">") picks the larger unit
    (1e9, "1.00 GB"),
    (1e6, "1.00 MB"),
    (1e3, "1.00 KB"),
    (2_500, "2.50 KB"),  # 2500 / 1e3 = 2.5 (n * scale would print 2500000.00)
    (3_250_000_000_000, "3.25 TB"),  # 3.25e12 / 1e12
    (-4_500_000, "-4.50 MB"),  # abs(n) >= 1e6; -4.5e6 / 1e6
    (999, "999 B"),
])
def test_format_bytes_units_and_boundaries(n: float, text: str) -> None:
    assert format_bytes(n) == text


def _arch() -> Architecture:
    return Architecture(family="hand", num_layers=1, hidden_size=32, vocab_size=32, moe_layers=(),
                        shared_experts=0, blocks=(), kv_cache=KVCacheSpec("gqa", 2, 1))


def test_make_budget_errors_name_the_flag() -> None:
    """The message starts with the CLI flag (a user-facing contract): ``--budget:`` / ``--overhead:``."""
    with pytest.raises(InputError) as err:
        make_budget(_arch(), "abc")
    assert str(err.value).startswith("--budget: ")
    with pytest.raises(InputError) as err:
        make_budget(_arch(), "1GB", context=0, overhead="abc")
    assert str(err.value).startswith("--overhead: ")


# ---------------------------------------------------------------------------------------- byte_model.py
def _hand_arch(blocks: tuple[Block, ...], experts: int = 4) -> Architecture:
    return Architecture(family="hand", num_layers=1, hidden_size=32, vocab_size=32,
                        moe_layers=(MoELayer(0, experts, 2),), shared_experts=0, blocks=blocks,
                        kv_cache=KVCacheSpec("gqa", 2, 1), expert_projections=("down_proj",))


def test_uniform_bytes_keeps_fixed_formats_of_equal_shapes_apart() -> None:
    """Two non-quantizable [8] tensors, one F32 and one F16, must not share a shape group."""
    arch = _hand_arch((
        Block("a.norm", BlockKind.NORM, (8,), quantizable=False, fixed_format="F32"),  # 8 * 4 = 32
        Block("b.norm", BlockKind.NORM, (8,), quantizable=False, fixed_format="F16"),  # 8 * 2 = 16
        Block("w", BlockKind.ATTENTION, (1, 32)),  # Q8_0: 34
    ))
    assert uniform_bytes(arch, "Q8_0") == 32 + 16 + 34
    assert uniform_bytes_by_kind(arch, "Q8_0") == {BlockKind.NORM: 48, BlockKind.ATTENTION: 34}


def _router(name: str = "model.layers.0.mlp.gate.weight", shape: tuple[int, ...] = (4, 8), layer: int | None = 0,
            kind: BlockKind = BlockKind.ROUTER) -> Block:
    return Block(name, kind, shape, layer, quantizable=False, fixed_format="F32")


@pytest.mark.parametrize(("block", "expected"), [
    (_router(), True),  # a router with one row per expert (4 rows, layer 0 has 4 experts)
    (_router(shape=(4,)), True),  # 1-D score-correction bias of 4 entries
    (_router(shape=(3, 4)), False),  # 3 rows != 4 experts
    (_router(shape=(8, 4)), False),  # 8 rows != 4 experts (shape[1] == 4 must not count)
    (_router(layer=None), False),  # not in a layer
    (_router(layer=1), False),  # layer 1 is not an MoE layer
    (_router(name="model.layers.0.mlp.shared_expert_gate.weight"), False),  # Qwen's shared-expert gate
    (_router(kind=BlockKind.ATTENTION), False),  # not a router, even with 4 rows in an MoE layer
])
def test_is_router_row_block(block: Block, expected: bool) -> None:
    assert is_router_row_block(block, {0: 4}) is expected


def _moe_arch(expert_fixed: str | None = None) -> Architecture:
    blocks = [_router(shape=(4, 32))]  # F32: 4 * 32 * 4 = 512 bytes, 128 per expert row
    blocks += [Block(f"model.layers.0.mlp.experts.{e}.down_proj.weight", BlockKind.ROUTED_EXPERT, (1, 32), 0, e,
                     "down_proj", fixed_format=expert_fixed) for e in range(4)]
    blocks.append(Block("model.norm.weight", BlockKind.NORM, (8,), quantizable=False, fixed_format="F32"))  # 32
    return _hand_arch(tuple(blocks))


def _expert(e: int) -> str:
    return f"model.layers.0.mlp.experts.{e}.down_proj.weight"


def test_plan_bytes_by_kind_prunes_experts_and_router_rows() -> None:
    formats = {_expert(0): "Q8_0", _expert(1): "Q4_0", _expert(2): "Q8_0", _expert(3): "Q8_0"}
    got = plan_bytes_by_kind(_moe_arch(), {0: [1, 3]}, formats)
    # kept experts 1 (Q4_0: 18) and 3 (Q8_0: 34); router 512 // 4 rows * 2 kept = 256; the norm (after the
    # pruned experts in block order) 32
    assert got == {"routed_expert": 18 + 34, "router": 256, "norm": 32}
    assert all(type(v) is int for v in got.values())
    # a layer absent from ``kept`` keeps all: 34 + 18 + 34 + 34 = 120, full router 512
    assert plan_bytes_by_kind(_moe_arch(), {}, formats) == {"routed_expert": 120, "router": 512, "norm": 32}


def test_plan_bytes_by_kind_quantizable_block_needs_a_format() -> None:
    """A quantizable block's ``fixed_format`` is no default: without a plan format it is an error."""
    formats = {_expert(0): "Q8_0", _expert(1): "Q4_0", _expert(2): "Q8_0"}
    with pytest.raises(InputError, match=r"plan\.formats: no format for model\.layers\.0\.mlp\.experts\.3\."):
        plan_bytes_by_kind(_moe_arch(expert_fixed="F32"), {0: [0, 1, 2, 3]}, formats)
