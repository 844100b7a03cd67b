"""runtime apply / load: bytes, equality with the in-memory compressed model, routing, safety, kill and rerun."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optimizer.architectures import load_architecture
from optimizer.errors import InputError
from optimizer.plan import save_plan
from runtime import moe
from runtime.apply import apply_plan
from runtime.inmemory import compress_in_memory
from runtime.load import load
from runtime.testing import made_up_plan, restrict_plan
from runtime.tiny_models import FAMILIES, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {f: make_tiny_model(f, tmp_path_factory.mktemp(f)) for f in FAMILIES}


def _pruned_plan(model_dir: Path, solver: str = "highs"):
    """A solver's plan, then layer-specific expert counts and k (balanced groups for DeepSeek)."""
    plan = made_up_plan(model_dir, solver=solver)
    arch = load_architecture(model_dir)
    first, second = arch.moe_layers[0].index, arch.moe_layers[1].index
    if arch.expert_groups > 1:
        changes = {first: ([0, 2, 5, 7], 1), second: ([1, 2, 3, 4, 6, 7], 2)}
    else:
        changes = {first: ([0, 2, 3, 5, 7], 1), second: ([1, 2, 3, 4, 5, 6], 2)}
    return restrict_plan(plan, arch, changes)


def _reference(model_dir: Path, plan, method: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return compress_in_memory(model, plan, method)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_apply_load_equals_in_memory(tiny: dict, tmp_path: Path, family: str) -> None:
    plan = _pruned_plan(tiny[family])
    save_plan(plan, tmp_path / "plan.json")
    method = "hqq" if family == "deepseek_v3" else "rtn"
    report = apply_plan(tmp_path / "plan.json", tiny[family], tmp_path / "out", method)
    assert report.native and report.weight_bytes == plan.bytes.total
    model = load(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["moecc"]
    assert [e["kept_experts"] for e in cfg["layers"]] == [list(lp.kept_experts) for lp in plan.layers]
    for lp in plan.layers:
        assert moe.num_experts(model, lp.layer) == len(lp.kept_experts)
        assert moe.top_k(model, lp.layer) == lp.top_k
    seen: dict[int, list[torch.Tensor]] = {}
    for h in moe.moe_layers(model):
        h.experts.register_forward_hook(lambda m, a, o, i=h.index: seen.setdefault(i, []).append(a[1].clone()))
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    logits = model(x).logits
    ref = _reference(tiny[family], plan, method)(x).logits
    assert torch.allclose(logits, ref, atol=1e-5), float((logits - ref).abs().max())
    for lp in plan.layers:  # routing never reaches a pruned expert; k is in effect
        idx = torch.cat(seen[lp.layer])
        assert idx.shape[-1] == lp.top_k and int(idx.max()) < len(lp.kept_experts)


@pytest.mark.parametrize("solver", ["highs", "greedy", "sequential", "uniform"])
def test_every_solver_applies_with_exact_bytes(tiny: dict, tmp_path: Path, solver: str) -> None:
    for family in ("qwen2_moe", "deepseek_v3"):
        plan = made_up_plan(tiny[family], solver=solver)
        save_plan(plan, tmp_path / f"{family}.json")
        report = apply_plan(tmp_path / f"{family}.json", tiny[family], tmp_path / family)
        assert report.weight_bytes == plan.bytes.total
        load(tmp_path / family)(torch.randint(0, 256, (1, 8)))


def test_gguf_block_formats_apply_with_exact_bytes(tiny: dict, tmp_path: Path) -> None:
    d = tiny["olmoe"]
    plan = made_up_plan(d, formats=("Q8_0", "Q4_0", "BF16"), solver="uniform")
    arch = load_architecture(d)
    plan = restrict_plan(plan, arch, {}, {n: "Q4_0" for n, f in plan.formats.items() if f == "Q4_0"})
    save_plan(plan, tmp_path / "p.json")
    report = apply_plan(tmp_path / "p.json", d, tmp_path / "out")
    assert report.native and report.weight_bytes == plan.bytes.total


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)


def test_refuses_other_model_and_bad_groups_before_reading(tiny: dict, tmp_path: Path) -> None:
    plan = made_up_plan(tiny["qwen3_moe"])
    save_plan(plan, tmp_path / "plan.json")
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text((tiny["olmoe"] / "config.json").read_text())
    (fake / "model.safetensors").write_bytes(b"not a safetensors file")
    r = _cli("apply", str(tmp_path / "plan.json"), "--model", str(fake), "-o", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 2 and "different model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    arch = load_architecture(tiny["deepseek_v3"])
    bad = restrict_plan(made_up_plan(tiny["deepseek_v3"]), arch, {arch.moe_layers[0].index: ([0, 1, 2, 4, 5], 2)})
    save_plan(bad, tmp_path / "bad.json")
    with pytest.raises(InputError, match="same number of kept experts"):
        apply_plan(tmp_path / "bad.json", tiny["deepseek_v3"], tmp_path / "o2")
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()


_KILL_AFTER_30 = """
import os, signal, sys
from runtime.apply import apply_plan
def progress(done, total, name):
    if done >= 30:
        os.kill(os.getpid(), signal.SIGKILL)
apply_plan(sys.argv[1], sys.argv[2], sys.argv[3], shard_bytes=20_000, progress=progress)
"""


def test_kill_and_rerun_gives_identical_files(tiny: dict, tmp_path: Path) -> None:
    d = tiny["mixtral"]
    save_plan(_pruned_plan(d, "greedy"), tmp_path / "plan.json")
    killed = subprocess.run([sys.executable, "-c", _KILL_AFTER_30, str(tmp_path / "plan.json"), str(d),
                             str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.moecc-partial").exists()
    args = ["apply", str(tmp_path / "plan.json"), "--model", str(d), "--quiet", "--shard-size", "20KB"]
    rerun = _cli(*args, "-o", str(tmp_path / "out"))
    assert rerun.returncode == 0, rerun.stderr
    assert "within 0.5%" in rerun.stdout and not (tmp_path / ".out.moecc-partial").exists()
    apply_plan(tmp_path / "plan.json", d, tmp_path / "clean", shard_bytes=20_000)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert len([n for n in names if n.endswith(".safetensors")]) > 1
    assert names == sorted(p.name for p in (tmp_path / "clean").iterdir())
    for n in set(names) - {"README.md", "moecc_output.json"}:  # these two record the command that wrote them
        assert (tmp_path / "out" / n).read_bytes() == (tmp_path / "clean" / n).read_bytes(), n


@torch.no_grad()
def test_eval_reads_a_compressed_checkpoint(tiny: dict, tmp_path: Path) -> None:
    """`runtime eval OUT` scores the pruned, quantized model, exactly as the in-memory compression does."""
    from runtime.evaluate import evaluate

    d = tiny["qwen3_moe"]
    plan = _pruned_plan(d)
    save_plan(plan, tmp_path / "plan.json")
    apply_plan(tmp_path / "plan.json", d, tmp_path / "out")
    stored = evaluate(tmp_path / "out", max_tokens=96, window=32)
    in_memory = evaluate(_reference(d, plan, "rtn"), max_tokens=96, window=32)
    original = evaluate(d, max_tokens=96, window=32)
    assert stored.tokens == in_memory.tokens == 96
    assert stored.nll == pytest.approx(in_memory.nll, abs=1e-5)
    assert stored.nll != pytest.approx(original.nll, abs=1e-6)  # the plan changed the model
    proc = _cli("eval", str(tmp_path / "out"), "--max-tokens", "64", "--window", "32")
    assert proc.returncode == 0, proc.stderr


@torch.no_grad()
def test_in_memory_compression_of_a_model_trained_with_the_router_aux_loss(tiny: dict) -> None:
    """R2's config keeps output_router_logits=True; its aux loss assumes every layer's original expert count,
    so a pruned model used to fail in forward (size 32 vs 29); compression turns it off, as runtime.load does."""
    from transformers import AutoModelForCausalLM

    d = tiny["qwen3_moe"]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    model.config.output_router_logits = True
    out = compress_in_memory(model, _pruned_plan(d))
    assert out.config.output_router_logits is False
    assert torch.isfinite(out(torch.randint(0, 256, (1, 16))).logits).all()
