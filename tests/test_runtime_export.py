"""runtime export: llama.cpp recipe (and refusals), GPTQModel and torchao maps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimizer.architectures import load_architecture
from optimizer.errors import InputError
from optimizer.plan import save_plan
from runtime.export import export
from runtime.testing import made_up_plan, restrict_plan
from runtime.tiny_models import make_tiny_model

GGUF_FORMATS = ("Q4_0", "Q5_0", "Q8_0", "BF16")


@pytest.fixture(scope="module")
def dsv3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("deepseek_v3", tmp_path_factory.mktemp("dsv3"))


def test_llamacpp_recipe(dsv3: Path, tmp_path: Path) -> None:
    plan = made_up_plan(dsv3, formats=GGUF_FORMATS, target="llamacpp", fraction=0.5)
    arch = load_architecture(dsv3)
    plan = restrict_plan(plan, arch, {m.index: ([0, 1, 4, 5], 1) for m in arch.moe_layers})
    save_plan(plan, tmp_path / "plan.json")
    export(tmp_path / "plan.json", "llamacpp", tmp_path / "r", dsv3)
    lines = (tmp_path / "r" / "tensor-types.txt").read_text().splitlines()
    types = dict(line.split("=") for line in lines)
    assert types["blk.1.ffn_down_exps.weight"] == plan.formats["model.layers.1.mlp.experts.0.down_proj.weight"]
    assert "token_embd.weight" in types and "output.weight" in types
    assert not any("norm" in t or "ffn_gate_inp" in t for t in types)
    kv = (tmp_path / "r" / "override-kv.txt").read_text().split()
    assert kv == ["deepseek2.expert_used_count=int:1", "deepseek2.expert_count=int:4"]
    export(tmp_path / "plan.json", "llamacpp", tmp_path / "r2", None)  # names from the plan alone
    assert (tmp_path / "r2" / "tensor-types.txt").read_text() == "\n".join(lines) + "\n"


def test_llamacpp_refusals(dsv3: Path, tmp_path: Path) -> None:
    arch = load_architecture(dsv3)
    plan = made_up_plan(dsv3, formats=GGUF_FORMATS, target="llamacpp", fraction=0.5)
    l0, l1 = (m.index for m in arch.moe_layers)
    cases = {
        "per_k": restrict_plan(plan, arch, {l0: (list(range(8)), 1), l1: (list(range(8)), 2)}),
        "per_count": restrict_plan(plan, arch, {l0: ([0, 1, 4, 5], 2), l1: (list(range(8)), 2)}),
        "per_expert": restrict_plan(plan, arch, {}, {f"model.layers.{l0}.mlp.experts.0.up_proj.weight": "Q8_0",
                                                     f"model.layers.{l0}.mlp.experts.1.up_proj.weight": "Q4_0"}),
        "runtime_format": made_up_plan(dsv3),
    }
    for name, bad in cases.items():
        save_plan(bad, tmp_path / f"{name}.json")
        with pytest.raises(InputError, match="--target llamacpp"):
            export(tmp_path / f"{name}.json", "llamacpp", tmp_path / name, dsv3)


def test_gptqmodel_and_torchao(dsv3: Path, tmp_path: Path) -> None:
    plan = made_up_plan(dsv3)
    save_plan(plan, tmp_path / "plan.json")
    export(tmp_path / "plan.json", "gptqmodel", tmp_path / "g", dsv3)
    export(tmp_path / "plan.json", "torchao", tmp_path / "t", dsv3)
    g = json.loads((tmp_path / "g" / "gptqmodel.json").read_text())
    assert g["bits"] in range(2, 9) and all(k[:2] in ("+:", "-:") for k in g["dynamic"])
    t = json.loads((tmp_path / "t" / "torchao.json").read_text())["module_fqn_to_config"]
    name = "model.layers.1.mlp.experts.0.down_proj"
    fmt = plan.formats[name + ".weight"]
    assert (t[name] is None) == (fmt == "BF16")
    with pytest.raises(InputError, match="--model"):
        export(tmp_path / "plan.json", "torchao", tmp_path / "t2", None)
