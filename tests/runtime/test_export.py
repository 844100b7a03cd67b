"""runtime export: llama.cpp recipe (and refusals), GPTQModel and torchao maps."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from optimizer.architectures import load_architecture
from optimizer.errors import InputError
from optimizer.plan import save_plan
from runtime.export import GGUF_ARCH, export, parse_tensor_types
from runtime.prune_checkpoint import write_pruned_checkpoint
from runtime.testing import made_up_plan, restrict_plan
from runtime.tiny_models import FAMILIES, make_tiny_model

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
    text = (tmp_path / "r" / "tensor-types.txt").read_text()
    assert text.splitlines()[0].startswith("^blk\\.") and text.splitlines()[0].split("=")[0].endswith("$")
    types = parse_tensor_types(text)
    assert types["blk.1.ffn_down_exps.weight"] == plan.formats["model.layers.1.mlp.experts.0.down_proj.weight"]
    assert "token_embd.weight" in types and "output.weight" in types
    assert not any("norm" in t or "ffn_gate_inp" in t for t in types)
    kv = (tmp_path / "r" / "override-kv.txt").read_text().split()
    assert kv == ["deepseek2.expert_used_count=int:1"]  # the pruned checkpoint's config carries the count
    readme = (tmp_path / "r" / "README.md").read_text()
    assert "convert_hf_to_gguf.py hf-pruned --outtype bf16 --outfile model-bf16.gguf" in readme
    assert "Write the pruned checkpoint first" not in readme  # it is here already
    assert "llama-quantize --tensor-type-file tensor-types.txt model-bf16.gguf model-plan.gguf Q8_0" in readme
    assert (tmp_path / "r" / "hf-pruned" / "model.safetensors").is_file()  # written by default: the plan prunes
    export(tmp_path / "plan.json", "llamacpp", tmp_path / "r2", None)  # names from the plan alone
    assert (tmp_path / "r2" / "tensor-types.txt").read_text() == text
    assert not (tmp_path / "r2" / "hf-pruned").exists()
    assert "python -m runtime export PLAN --to llamacpp --model" in (tmp_path / "r2" / "README.md").read_text()


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


# --------------------------------------------------------------------------- pruned checkpoint (hf-pruned)

def _keep(expert_groups: int) -> tuple[list[int], int]:
    """Kept experts and k: a grouped router (DeepSeek, GLM-4-MoE) keeps 2 of 4 in each of its 2 groups."""
    return ([1, 3, 4, 6], 1) if expert_groups > 1 else ([0, 2, 5, 6, 7], 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_checkpoint_matches_in_memory_pruning(family: str, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from runtime.moe import drop_experts, moe_layers, set_top_k

    torch.set_num_threads(1)
    model_dir = make_tiny_model(family, tmp_path / "model")
    arch = load_architecture(model_dir)
    keep, k = _keep(arch.expert_groups)
    plan = made_up_plan(model_dir, formats=GGUF_FORMATS, target="llamacpp", fraction=0.6)
    plan = restrict_plan(plan, arch, {m.index: (keep, k) for m in arch.moe_layers})
    save_plan(plan, tmp_path / "plan.json")
    if family in GGUF_ARCH:
        paths = export(tmp_path / "plan.json", "llamacpp", tmp_path / "recipe", model_dir)
        out = tmp_path / "recipe" / "hf-pruned"
        assert out in paths
    else:  # no llama.cpp converter: refused in one line, nothing written; the pruned checkpoint is generic
        from runtime.gguf_export import check_convertible, export_gguf

        refused = f"^llama.cpp's converter has no architecture for {family} models"
        with pytest.raises(InputError, match=refused):
            export(tmp_path / "plan.json", "llamacpp", tmp_path / "recipe", model_dir)
        with pytest.raises(InputError, match=refused):
            export_gguf(tmp_path / "plan.json", model_dir, tmp_path / "model.gguf")
        with pytest.raises(InputError, match=refused):  # runtime eval model.gguf --reference MODEL
            check_convertible(arch, model_dir)
        assert not (tmp_path / "recipe").exists() and not (tmp_path / "model.gguf").exists()
        out = tmp_path / "hf-pruned"
        write_pruned_checkpoint(plan, arch, model_dir, out)
    assert (out / "byte_tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["num_experts_per_tok"] == k
    assert config.get("n_routed_experts", config.get("num_experts", config.get("num_local_experts"))) == len(keep)
    assert config["moecc_pruned"]["kept_experts"][str(arch.moe_layers[0].index)] == keep
    assert all(m.num_experts == len(keep) for m in load_architecture(out).moe_layers)

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for h in moe_layers(ref):
        set_top_k(ref, h.index, min(k, h.top_k))
        drop_experts(ref, h.index, keep)
        set_top_k(ref, h.index, k)
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert all(h.num_experts == len(keep) and h.top_k == k for h in moe_layers(pruned))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_pruned_checkpoint_refusals(dsv3: Path, tmp_path: Path) -> None:
    arch = load_architecture(dsv3)
    plan = made_up_plan(dsv3, formats=GGUF_FORMATS, target="llamacpp", fraction=0.6)
    l0, l1 = (m.index for m in arch.moe_layers)
    cases = {
        "per_layer_count": (restrict_plan(plan, arch, {l0: ([0, 1, 4, 5], 1), l1: ([0, 1, 2, 4, 5, 6], 1)}),
                            "one expert count"),
        "per_layer_k": (restrict_plan(plan, arch, {l0: ([0, 1, 4, 5], 1), l1: ([0, 1, 4, 5], 2)}), "one top-k"),
        "unbalanced_groups": (restrict_plan(plan, arch, {l0: ([0, 1, 4], 1), l1: ([0, 1, 4], 1)}), "groups"),
        "k_beyond_groups": (restrict_plan(plan, arch, {l0: ([0, 1, 4, 5], 3), l1: ([0, 1, 4, 5], 3)}), "top_k=3"),
    }
    for name, (bad, message) in cases.items():
        save_plan(bad, tmp_path / f"{name}.json")
        with pytest.raises(InputError, match=message):
            export(tmp_path / f"{name}.json", "llamacpp", tmp_path / name, dsv3, pruned_checkpoint=True)
        assert not (tmp_path / name / "hf-pruned").exists()
    good = restrict_plan(plan, arch, {l0: ([0, 1, 4, 5], 1), l1: ([0, 1, 4, 5], 1)})
    save_plan(good, tmp_path / "good.json")
    with pytest.raises(InputError, match="checkpoint directory"):
        export(tmp_path / "good.json", "llamacpp", tmp_path / "g", dsv3 / "config.json", pruned_checkpoint=True)
    with pytest.raises(InputError, match="only for --to llamacpp"):
        export(tmp_path / "good.json", "torchao", tmp_path / "g", dsv3, pruned_checkpoint=True)
    export(tmp_path / "good.json", "llamacpp", tmp_path / "skip", dsv3, pruned_checkpoint=False)
    assert not (tmp_path / "skip" / "hf-pruned").exists()


def test_export_cli_pruned_checkpoint(dsv3: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from runtime.__main__ import main

    arch = load_architecture(dsv3)
    plan = made_up_plan(dsv3, formats=GGUF_FORMATS, target="llamacpp", fraction=0.6)
    l0, l1 = (m.index for m in arch.moe_layers)
    save_plan(restrict_plan(plan, arch, {l0: ([0, 1, 4, 5], 1), l1: ([0, 1, 2, 4, 5, 6], 1)}), tmp_path / "bad.json")
    assert main(["export", str(tmp_path / "bad.json"), "--to", "llamacpp", "--model", str(dsv3),
                 "-o", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
    full = restrict_plan(plan, arch, {m.index: (list(range(8)), 2) for m in arch.moe_layers})
    save_plan(full, tmp_path / "full.json")
    assert main(["export", str(tmp_path / "full.json"), "--to", "llamacpp", "--model", str(dsv3),
                 "-o", str(tmp_path / "full")]) == 0
    assert not (tmp_path / "full" / "hf-pruned").exists()  # nothing pruned: convert the original checkpoint
    assert f"convert_hf_to_gguf.py {dsv3} " in (tmp_path / "full" / "README.md").read_text()


def test_tied_qwen2_moe_gets_an_output_head(tmp_path: Path) -> None:
    """llama.cpp's qwen2moe/olmoe need output.weight: a tied checkpoint is untied in hf-pruned."""
    import torch
    from transformers import AutoModelForCausalLM

    from runtime.tiny_models import make_tiny_model

    torch.set_num_threads(1)
    make_tiny_model("qwen2_moe", tmp_path / "tied", tie_word_embeddings=True)
    arch = load_architecture(tmp_path / "tied")
    plan = made_up_plan(tmp_path / "tied", formats=GGUF_FORMATS, target="llamacpp", fraction=0.8)
    assert "lm_head.weight" not in plan.formats
    full = restrict_plan(plan, arch, {m.index: (list(range(8)), 2) for m in arch.moe_layers})
    save_plan(full, tmp_path / "plan.json")
    export(tmp_path / "plan.json", "llamacpp", tmp_path / "r", tmp_path / "tied")  # default: written (tied)
    types = parse_tensor_types((tmp_path / "r" / "tensor-types.txt").read_text())
    assert types["output.weight"] == types["token_embd.weight"]
    assert "no tied output head" in (tmp_path / "r" / "README.md").read_text()
    out = tmp_path / "r" / "hf-pruned"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "tied", dtype=torch.float32).eval()
    untied = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(untied(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-6)


def test_dots1_gets_the_gating_function_llama_cpp_reads(tmp_path: Path) -> None:
    """transformers' dots1 routes with sigmoid scores but writes no scoring_func; llama.cpp's converter then writes
    no gating function and llama.cpp aborts on the first MoE layer (found by running it): hf-pruned has it, and is
    written for a plan that prunes nothing."""
    from runtime.prune_checkpoint import converter_config_fixes

    model = make_tiny_model("dots1", tmp_path / "dots1")
    arch = load_architecture(model)
    assert converter_config_fixes(model) == {"scoring_func": "sigmoid"}
    plan = made_up_plan(model, formats=GGUF_FORMATS, target="llamacpp", fraction=0.8)
    save_plan(restrict_plan(plan, arch, {m.index: (list(range(8)), 2) for m in arch.moe_layers}), tmp_path / "p.json")
    export(tmp_path / "p.json", "llamacpp", tmp_path / "r", model)
    config = json.loads((tmp_path / "r" / "hf-pruned" / "config.json").read_text())
    assert config["scoring_func"] == "sigmoid" and not converter_config_fixes(tmp_path / "r" / "hf-pruned")
    assert "`hf-pruned/config.json` has it" in (tmp_path / "r" / "README.md").read_text()
    with pytest.raises(InputError, match="^--no-pruned-checkpoint: llama.cpp's converter needs"):
        export(tmp_path / "p.json", "llamacpp", tmp_path / "r2", model, pruned_checkpoint=False)


def test_glm4_moe_lite_gets_the_leading_dense_count_and_gating_function_llama_cpp_reads(tmp_path: Path) -> None:
    """transformers' glm4_moe_lite names its dense layers in mlp_layer_types and routes with sigmoid scores without
    a scoring_func; llama.cpp's converter (deepseek2) reads first_k_dense_replace and scoring_func: hf-pruned has
    both, and the README names them."""
    from runtime.prune_checkpoint import converter_config_fixes, leading_dense_layers

    assert leading_dense_layers(None) == 1 and leading_dense_layers(["dense", "dense", "sparse"]) == 2
    model = make_tiny_model("glm4_moe_lite", tmp_path / "lite")
    arch = load_architecture(model)
    assert converter_config_fixes(model) == {"scoring_func": "sigmoid", "first_k_dense_replace": 1}
    keep, k = _keep(arch.expert_groups)
    plan = made_up_plan(model, formats=GGUF_FORMATS, target="llamacpp", fraction=0.6)
    save_plan(restrict_plan(plan, arch, {m.index: (keep, k) for m in arch.moe_layers}), tmp_path / "p.json")
    export(tmp_path / "p.json", "llamacpp", tmp_path / "r", model)
    config = json.loads((tmp_path / "r" / "hf-pruned" / "config.json").read_text())
    assert (config["scoring_func"], config["first_k_dense_replace"]) == ("sigmoid", 1)
    assert not converter_config_fixes(tmp_path / "r" / "hf-pruned")
    readme = (tmp_path / "r" / "README.md").read_text()
    assert "`scoring_func: sigmoid`, `first_k_dense_replace: 1`" in readme
    with pytest.raises(InputError, match="^--no-pruned-checkpoint: llama.cpp's converter needs"):
        export(tmp_path / "p.json", "llamacpp", tmp_path / "r2", model, pruned_checkpoint=False)


def test_mtp_layer_is_left_out_of_the_pruned_checkpoint(tmp_path: Path) -> None:
    """GLM-4.5 stores its multi-token-prediction layer after the last one, experts unpruned (transformers does not
    build it): the converter would read them against the pruned count, so hf-pruned leaves the layer out."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model = make_tiny_model("glm4_moe", tmp_path / "glm")
    arch = load_architecture(model)
    tensors = load_file(model / "model.safetensors")
    last = f"model.layers.{arch.num_layers - 1}."
    mtp = {n.replace(last, f"model.layers.{arch.num_layers}."): t.clone() for n, t in tensors.items() if last in n}
    save_file({**tensors, **mtp}, model / "model.safetensors", metadata={"format": "pt"})
    keep, k = _keep(arch.expert_groups)
    plan = made_up_plan(model, formats=GGUF_FORMATS, target="llamacpp", fraction=0.6)
    save_plan(restrict_plan(plan, arch, {m.index: (keep, k) for m in arch.moe_layers}), tmp_path / "p.json")
    export(tmp_path / "p.json", "llamacpp", tmp_path / "r", model)
    with safe_open(str(tmp_path / "r" / "hf-pruned" / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert not any(n.startswith(f"model.layers.{arch.num_layers}.") for n in names)
    experts = {int(n.split(".")[5]) for n in names if n.startswith(f"{last}mlp.experts.")}
    assert experts == set(range(len(keep)))  # the last real layer is pruned as planned


def test_zero_shared_expert_gates_are_nudged_for_llamacpp(tmp_path: Path) -> None:
    """R3's shared-expert gates are zero; llama.cpp's silu(x)/x gate makes them NaN. The export writes hf-pruned
    (even when nothing is pruned) with those gates at 1e-20: sigmoid(1e-20 h) is 0.5 in float32, as for 0."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model("qwen2_moe", tmp_path / "model")
    weights = load_file(str(model_dir / "model.safetensors"))
    gates = sorted(n for n in weights if n.endswith("shared_expert_gate.weight"))
    assert gates
    for n in gates:
        weights[n] = torch.zeros_like(weights[n])
    save_file(weights, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    arch = load_architecture(model_dir)
    plan = made_up_plan(model_dir, formats=GGUF_FORMATS, target="llamacpp", fraction=0.9)
    plan = restrict_plan(plan, arch, {m.index: (list(range(m.num_experts)), m.top_k) for m in arch.moe_layers})
    save_plan(plan, tmp_path / "plan.json")
    paths = export(tmp_path / "plan.json", "llamacpp", tmp_path / "r", model_dir)
    out = tmp_path / "r" / "hf-pruned"
    assert out in paths and "1e-20" in (tmp_path / "r" / "README.md").read_text()
    written = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(written[n], torch.full_like(weights[n], 1e-20)) for n in gates)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(input_ids=ids).logits
        new = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()(input_ids=ids).logits
    assert torch.equal(new, ref)
    with pytest.raises(InputError, match="shared_expert_gate weights .* are all zero"):
        export(tmp_path / "plan.json", "llamacpp", tmp_path / "r2", model_dir, pruned_checkpoint=False)
