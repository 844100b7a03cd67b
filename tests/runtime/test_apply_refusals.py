"""runtime apply's refusals, one by one: each bad input raises its own error (type and message), writes nothing.

The tiny Qwen3-MoE (runtime.tiny_models): layer 0 dense, layers 1 and 2 MoE with 8 experts (top-2), hidden 32.
Bad checkpoints are copies of it with one tensor removed, retyped or reshaped in ``model.safetensors``.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from optimizer.architectures import load_architecture
from optimizer.errors import InputError
from optimizer.plan import LayerPlan, SolveStatus, save_plan
from runtime import apply as apply_mod
from runtime.apply import BYTES_TOLERANCE, ByteCountError, apply_plan, check_inputs
from runtime.plan_check import validate_layers
from runtime.testing import made_up_plan, restrict_plan
from runtime.tiny_models import make_tiny_model

NORM = "model.layers.1.input_layernorm.weight"  # shape (32,)
EXPERT7 = "model.layers.1.mlp.experts.7.gate_proj.weight"
pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small forwards on shared CPUs


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    d = make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))
    return d, load_architecture(d), made_up_plan(d, solver="greedy")


def _save(plan, path: Path) -> Path:
    save_plan(plan, path)
    return path


def _copy_with(model_dir: Path, dest: Path, edit) -> Path:
    """A copy of ``model_dir`` whose ``model.safetensors`` is ``edit(tensors)``."""
    from safetensors.torch import load_file, save_file

    dest.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, dest / f.name)
    tensors = load_file(str(model_dir / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def test_existing_output_needs_overwrite(tiny, tmp_path: Path) -> None:
    d, _, plan = tiny
    p = _save(plan, tmp_path / "plan.json")
    apply_plan(p, d, tmp_path / "out")
    before = {f.name: f.stat().st_mtime_ns for f in (tmp_path / "out").iterdir()}
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        apply_plan(p, d, tmp_path / "out")
    assert {f.name: f.stat().st_mtime_ns for f in (tmp_path / "out").iterdir()} == before  # untouched
    report = apply_plan(p, d, tmp_path / "out", overwrite=True)
    assert report.weight_bytes == plan.bytes.total


def test_output_may_not_overlap_the_model_or_the_plan(tiny, tmp_path: Path) -> None:
    d, _, plan = tiny
    p = _save(plan, tmp_path / "plan.json")
    names = sorted(f.name for f in d.iterdir())
    for out in (d, d / "sub", p, d.parent):  # the model itself, inside it, the plan, a parent of the model
        with pytest.raises(InputError, match="would overlap the input"):
            apply_plan(p, d, out, overwrite=True)
    assert sorted(f.name for f in d.iterdir()) == names
    with pytest.raises(InputError, match="no such plan file"):
        apply_plan(tmp_path / "nope.json", d, tmp_path / "o")


def test_missing_tensor_is_refused(tiny, tmp_path: Path) -> None:
    d, _, plan = tiny
    bad = _copy_with(d, tmp_path / "m", lambda t: t.pop(NORM))
    with pytest.raises(InputError, match=rf"checkpoint lacks tensor {NORM} of the architecture \(1 missing\)"):
        apply_plan(_save(plan, tmp_path / "plan.json"), bad, tmp_path / "o")
    # two missing: the first in the architecture's order is named
    two = _copy_with(d, tmp_path / "m2", lambda t: (t.pop("model.layers.2.input_layernorm.weight"), t.pop(NORM)))
    with pytest.raises(InputError, match=rf"checkpoint lacks tensor {NORM} of the architecture \(2 missing\)"):
        apply_plan(tmp_path / "plan.json", two, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_fp8_checkpoint_is_refused(tiny, tmp_path: Path) -> None:
    d, _, plan = tiny

    def to_fp8(t: dict) -> None:
        t[NORM] = t[NORM].to(torch.float8_e4m3fn)

    bad = _copy_with(d, tmp_path / "m", to_fp8)
    with pytest.raises(InputError, match=rf"{NORM}: F8_E4M3 checkpoint; dequantize FP8"):
        apply_plan(_save(plan, tmp_path / "plan.json"), bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_shape_mismatch_is_refused(tiny, tmp_path: Path) -> None:
    d, _, plan = tiny

    def longer(t: dict) -> None:
        t[NORM] = torch.ones(33)

    bad = _copy_with(d, tmp_path / "m", longer)
    with pytest.raises(InputError, match=rf"{NORM}: checkpoint shape \[33\] != config's \[32\]"):
        apply_plan(_save(plan, tmp_path / "plan.json"), bad, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_unknown_plan_block_is_refused(tiny, tmp_path: Path) -> None:
    d, _, plan = tiny
    extra = dataclasses.replace(plan, formats={**plan.formats, "model.layers.1.mlp.nope.weight": "BF16"})
    with pytest.raises(InputError, match=r"plan.formats.model.layers.1.mlp.nope.weight: not a block"):
        apply_plan(_save(extra, tmp_path / "plan.json"), d, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_format_for_a_pruned_expert_is_refused(tiny, tmp_path: Path) -> None:
    d, arch, plan = tiny
    pruned = restrict_plan(plan, arch, {1: ([0, 1, 2, 3, 4, 5, 6], 2)})
    assert EXPERT7 not in pruned.formats
    # the pruned plan itself is fine ...
    assert len(check_inputs(_save(pruned, tmp_path / "ok.json"), d, tmp_path / "o", False, 1 << 30).jobs) > 0
    # ... but not with a format for a block of the pruned expert 7 (its bytes do not count, so only apply sees it)
    bad = dataclasses.replace(pruned, formats={**pruned.formats, EXPERT7: "int4_g32"})
    with pytest.raises(InputError, match=rf"plan.formats.{EXPERT7}: expert 7 of layer 1 is pruned"):
        apply_plan(_save(bad, tmp_path / "plan.json"), d, tmp_path / "o")
    # and a kept block without a format is refused as well (by the byte check first)
    no_fmt = dataclasses.replace(plan, formats={k: v for k, v in plan.formats.items() if k != EXPERT7})
    with pytest.raises(InputError, match=f"no format for {EXPERT7}"):
        apply_plan(_save(no_fmt, tmp_path / "nf.json"), d, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_plan_layers_are_checked(tiny, tmp_path: Path) -> None:
    d, arch, plan = tiny
    l1, l2 = plan.layers
    non_moe = dataclasses.replace(plan, layers=(LayerPlan(0, (0, 1), 1), l1, l2))
    with pytest.raises(InputError, match=r"layer 0 is not an MoE layer of the checkpoint \(its MoE layers: \[1, 2\]\)"):
        apply_plan(_save(non_moe, tmp_path / "nm.json"), d, tmp_path / "o")
    cases = [  # validate_layers itself (load_plan refuses some of these already)
        ((LayerPlan(0, (0, 1), 1), l1, l2), "layer 0 is not an MoE layer"),
        ((l1, l1, l2), "layer 1 appears twice"),
        ((l1,), r"no entry for MoE layer 2 \(1 of 2 MoE layers missing\)"),
        ((LayerPlan(1, l1.kept_experts, 0), l2), "top_k must be >= 1, got 0"),
        ((LayerPlan(1, (0, 0, 1), 1), l2), "kept experts must be distinct"),
        ((LayerPlan(1, (0, 8), 1), l2), r"kept experts must be distinct indices in 0..7"),
        ((LayerPlan(1, (), 1), l2), "must keep at least one expert"),
        ((LayerPlan(1, (0, 1), 3), l2), "top_k=3 exceeds the 2 experts"),
    ]
    for layers, message in cases:
        with pytest.raises(InputError, match=message):
            validate_layers(dataclasses.replace(plan, layers=layers), arch)
    assert validate_layers(dataclasses.replace(plan, layers=(LayerPlan(2, (5, 1), 2), l1)), arch) == {
        1: (list(l1.kept_experts), l1.top_k), 2: ([1, 5], 2)}  # sorted by layer, kept experts sorted
    failed = dataclasses.replace(plan, solve=dataclasses.replace(plan.solve, status=SolveStatus.INFEASIBLE))
    with pytest.raises(InputError, match="'infeasible'; only an optimal or feasible plan"):
        apply_plan(_save(failed, tmp_path / "f.json"), d, tmp_path / "o")
    edited = dataclasses.replace(plan, bytes=dataclasses.replace(plan.bytes, total=plan.bytes.total + 1))
    with pytest.raises(InputError, match="plan.bytes.total"):
        apply_plan(_save(edited, tmp_path / "e.json"), d, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_bad_method_and_calibration_tokens(tiny, tmp_path: Path) -> None:
    d, _, plan = tiny
    p = _save(plan, tmp_path / "plan.json")
    with pytest.raises(InputError, match="--method: 'awq' is not one of"):
        apply_plan(p, d, tmp_path / "o", method="awq")
    with pytest.raises(InputError, match="--calib-tokens must be positive, got 0"):
        apply_plan(p, d, tmp_path / "o", method="gptq", calib_tokens=0)
    for bad in (0, -1):  # refused before the plan is even looked at
        with pytest.raises(InputError, match=f"--calib-tokens must be positive, got {bad}"):
            apply_plan(tmp_path / "missing.json", d, tmp_path / "o", method="gptq", calib_tokens=bad)
    assert not (tmp_path / "o").exists()


def test_byte_tolerance_is_half_a_percent_both_ways(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights written W vs the plan's total T: |W - T| / T above 0.5% raises ByteCountError, nothing written.

    The plan's own byte check would refuse an edited total first, so it is bypassed (layers still validated)."""
    assert BYTES_TOLERANCE == 0.005
    d, _, plan = tiny
    monkeypatch.setattr(apply_mod, "check_plan", validate_layers)
    w = plan.bytes.total  # apply writes exactly the plan's bytes (tested elsewhere)
    for i, ratio in enumerate((1.0055, 0.9945)):  # T = W / ratio: W is 0.55% above / below T
        total = round(w / ratio)
        edited = dataclasses.replace(plan, bytes=dataclasses.replace(plan.bytes, total=total))
        with pytest.raises(ByteCountError, match=r"more than 0.5%\); .* was not written"):
            apply_plan(_save(edited, tmp_path / f"bad{i}.json"), d, tmp_path / f"o{i}")
        assert not (tmp_path / f"o{i}").exists()
        assert not (tmp_path / f".o{i}.moecc-partial").exists()
    for i, ratio in enumerate((1.0045, 0.9955)):  # 0.45% off either way: within the tolerance
        total = round(w / ratio)
        edited = dataclasses.replace(plan, bytes=dataclasses.replace(plan.bytes, total=total))
        report = apply_plan(_save(edited, tmp_path / f"ok{i}.json"), d, tmp_path / f"k{i}")
        assert report.native and report.weight_bytes == w and report.plan_bytes == total
        assert report.relative_diff == pytest.approx(ratio - 1, abs=1e-4)
        assert "within 0.5% as required" in report.lines()[1]
