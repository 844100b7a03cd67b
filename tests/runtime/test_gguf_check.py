"""runtime export --to gguf without llama.cpp: the read-back check on GGUFs written here with gguf.GGUFWriter,
the tool lookup, and the CLI's refusals (one line, exit code 2)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from optimizer.architectures import load_architecture
from optimizer.byte_model import is_router_row_block
from optimizer.plan import save_plan
from runtime.export import GGUF_ARCH, gguf_name
from runtime.gguf_export import GGUFCheckError, check_gguf, expected_tensors
from runtime.llamacpp import ENV_VAR, TOOLS, resolve
from runtime.testing import made_up_plan, restrict_plan
from runtime.tiny_models import make_tiny_model

GGUF_FORMATS = ("Q4_0", "Q5_0", "Q8_0", "BF16")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory):
    model = make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("qwen3"))
    arch = load_architecture(model)
    plan = made_up_plan(model, formats=GGUF_FORMATS, target="llamacpp", fraction=0.5)
    plan = restrict_plan(plan, arch, {m.index: ([0, 1, 4, 5], 1) for m in arch.moe_layers})
    return model, arch, plan


def _write_gguf(path: Path, arch, plan, types: dict[str, str] | None = None, drop_expert: str | None = None,
                skip: str | None = None, k: int | None = None, output_head: bool = False,
                split_kv_b: dict[str, str] | None = None) -> None:
    """A GGUF as llama.cpp would write for ``plan``: each block's tensor in the plan's type (experts of a layer
    stacked), fixed tensors in F32. ``types`` overrides GGUF types, ``drop_expert`` stores one expert fewer in
    that tensor, ``skip`` leaves a tensor out, ``k`` writes another top-k, ``split_kv_b`` (part -> type or "")
    writes DeepSeek's attn_kv_b as the converter does: attn_k_b (n_head, kv_lora_rank, qk_nope_head_dim) and
    attn_v_b (n_head, v_head_dim, kv_lora_rank)."""
    import gguf

    groups: dict[str, list] = {}
    for block in arch.blocks:
        fmt = plan.formats.get(block.name)
        if fmt is not None:
            groups.setdefault(gguf_name(block.name, arch.family, arch.num_layers), []).append((block, fmt))
    if output_head:  # llama.cpp's untied head of a tied qwen2moe: a copy of the embedding in its type
        groups["output.weight"] = groups["token_embd.weight"]
    per_layer = {m.index: m.num_experts for m in arch.moe_layers}
    kept = {lp.layer: lp.kept_experts for lp in plan.layers}
    prefix = GGUF_ARCH[arch.family]
    writer = gguf.GGUFWriter(str(path), prefix)
    writer.add_expert_count(len(plan.layers[0].kept_experts))
    writer.add_expert_used_count(plan.layers[0].top_k if k is None else k)
    if split_kv_b is not None:
        from runtime.tiny_models import tiny_config

        c = tiny_config(arch.family)
        shapes = {"attn_k_b": (c.num_attention_heads, c.kv_lora_rank, c.qk_nope_head_dim),
                  "attn_v_b": (c.num_attention_heads, c.v_head_dim, c.kv_lora_rank)}
        for name in [n for n in groups if n.endswith("attn_kv_b.weight")]:
            (block, fmt), = groups.pop(name)
            for part, shape in shapes.items():
                ggml = gguf.GGMLQuantizationType[split_kv_b.get(part) or fmt]
                block_size, type_size = gguf.GGML_QUANT_SIZES[ggml]
                byte_shape = (*shape[:-1], shape[-1] // block_size * type_size)
                writer.add_tensor(name.replace("attn_kv_b", part), np.zeros(byte_shape, dtype=np.uint8), raw_dtype=ggml)
    for name, parts in groups.items():
        if name == skip:
            continue
        block, fmt = parts[0]
        shape = tuple(int(d) for d in block.shape)
        if is_router_row_block(block, per_layer):  # the converter gets a router sliced to the kept experts
            shape = (len(kept[block.layer]), *shape[1:])
        count = len(parts) - (name == drop_expert)
        lead = (count,) if block.is_routed_expert else ()
        fixed = not block.quantizable or len(shape) < 2
        ggml = "F32" if fixed else (types or {}).get(name, fmt)
        qtype = gguf.GGMLQuantizationType[ggml]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, np.zeros((*lead, *shape), dtype=np.float32))
            continue
        block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
        byte_shape = (*lead, *shape[:-1], shape[-1] // block_size * type_size)
        writer.add_tensor(name, np.zeros(byte_shape, dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_matching_gguf_passes(qwen3, tmp_path: Path) -> None:
    _, arch, plan = qwen3
    _write_gguf(tmp_path / "ok.gguf", arch, plan)
    check = check_gguf(tmp_path / "ok.gguf", plan, arch)
    expected = expected_tensors(plan, arch)
    typed = [n for n, e in expected.items() if e.type is not None and e.planned]
    assert check.planned == len(typed) and check.fixed == len(expected) - len(typed) and not check.extra
    planned_bytes = sum(e.bytes for e in expected.values() if e.type is not None and e.planned)
    assert check.planned_bytes == planned_bytes
    assert check.expert_count == 4 and check.expert_used_count == 1
    assert check.planned_bytes + check.fixed_bytes_plan == plan.bytes.total  # routers: the kept rows only
    assert expected["blk.1.ffn_gate_inp.weight"].elements == 4 * 32
    assert "blk.1.ffn_down_exps.weight" in typed  # four experts merged into one tensor
    assert expected["blk.1.ffn_down_exps.weight"].type == plan.formats["model.layers.1.mlp.experts.0.down_proj.weight"]


def test_mismatches_are_listed(qwen3, tmp_path: Path) -> None:
    _, arch, plan = qwen3
    expected = expected_tensors(plan, arch)
    down = "blk.1.ffn_down_exps.weight"
    other = next(t for t in ("Q8_0", "Q4_0") if t != expected[down].type)
    _write_gguf(tmp_path / "type.gguf", arch, plan, types={down: other})
    with pytest.raises(GGUFCheckError, match=rf"1 differences.*{down}: {other} .* plan {expected[down].type}"):
        check_gguf(tmp_path / "type.gguf", plan, arch)
    up = "blk.2.ffn_up_exps.weight"
    _write_gguf(tmp_path / "bytes.gguf", arch, plan, drop_expert=up, skip="blk.0.ffn_down.weight", k=2)
    with pytest.raises(GGUFCheckError) as err:
        check_gguf(tmp_path / "bytes.gguf", plan, arch)
    msg = str(err.value)
    assert "3 differences" in msg and f"{up}: {expected[up].type}" in msg
    assert "blk.0.ffn_down.weight: missing from the GGUF" in msg
    assert "qwen3moe.expert_used_count: 2, plan [1]" in msg


def test_untied_output_head_is_checked_but_not_planned(tmp_path: Path) -> None:
    model = make_tiny_model("qwen2_moe", tmp_path / "tied", tie_word_embeddings=True)
    arch = load_architecture(model)
    plan = made_up_plan(model, formats=GGUF_FORMATS, target="llamacpp", fraction=0.8)
    plan = restrict_plan(plan, arch, {m.index: (list(range(8)), 2) for m in arch.moe_layers})
    expected = expected_tensors(plan, arch)
    assert not expected["output.weight"].planned and expected["output.weight"].type == plan.formats[
        "model.embed_tokens.weight"]
    _write_gguf(tmp_path / "ok.gguf", arch, plan, output_head=True)
    check = check_gguf(tmp_path / "ok.gguf", plan, arch)
    assert list(check.extra) == ["output.weight"] and "output.weight not in the plan" in check.summary()
    _write_gguf(tmp_path / "no-head.gguf", arch, plan)
    with pytest.raises(GGUFCheckError, match="output.weight: missing"):
        check_gguf(tmp_path / "no-head.gguf", plan, arch)


def test_deepseek_kv_b_split_into_k_b_and_v_b(tmp_path: Path) -> None:
    """llama.cpp's converter writes DeepSeek's kv_b_proj as attn_k_b + attn_v_b: the recipe types both, the check
    compares the pair with the plan's kv_b_proj."""
    from runtime.export import export, parse_tensor_types

    model = make_tiny_model("deepseek_v3", tmp_path / "dsv3")
    arch = load_architecture(model)
    plan = made_up_plan(model, formats=GGUF_FORMATS, target="llamacpp", fraction=0.6)
    plan = restrict_plan(plan, arch, {m.index: ([1, 3, 4, 6], 1) for m in arch.moe_layers})
    save_plan(plan, tmp_path / "plan.json")
    export(tmp_path / "plan.json", "llamacpp", tmp_path / "recipe", model)
    types = parse_tensor_types((tmp_path / "recipe" / "tensor-types.txt").read_text())
    fmt = plan.formats["model.layers.0.self_attn.kv_b_proj.weight"]
    assert types["blk.0.attn_k_b.weight"] == types["blk.0.attn_v_b.weight"] == fmt
    _write_gguf(tmp_path / "split.gguf", arch, plan, split_kv_b={})
    check = check_gguf(tmp_path / "split.gguf", plan, arch)
    assert not check.extra and check.planned_bytes + check.fixed_bytes_plan == plan.bytes.total
    _write_gguf(tmp_path / "fallback.gguf", arch, plan, split_kv_b={"attn_k_b": "F32"})
    both = "/".join(sorted({"F32", fmt}))
    with pytest.raises(GGUFCheckError, match=rf"blk.0.attn_k_b.weight\+blk.0.attn_v_b.weight: {both} "):
        check_gguf(tmp_path / "fallback.gguf", plan, arch)


def fake_llama_cpp(root: Path) -> Path:
    """A llama.cpp tree with every tool (an empty script) and the converter, nothing built."""
    tree = root / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    for t in TOOLS:
        (tree / "build" / "bin" / t).write_text("#!/bin/sh\n")
        (tree / "build" / "bin" / t).chmod(0o755)
    (tree / "convert_hf_to_gguf.py").write_text("")
    return tree


def test_tools_are_resolved_from_flag_env_or_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from optimizer.errors import InputError

    tree = fake_llama_cpp(tmp_path)
    monkeypatch.setenv(ENV_VAR, str(tree))
    found = resolve(None, TOOLS, converter=True)
    assert found.tool("llama-quantize") == (tree / "build" / "bin" / "llama-quantize").resolve()
    assert str(found.gguf_py) in found.converter_env()["PYTHONPATH"]
    with pytest.raises(InputError, match="python -m runtime llama-cpp build"):
        resolve(tmp_path / "nowhere")
    (tree / "build" / "bin" / "llama-imatrix").unlink()
    with pytest.raises(InputError, match="llama-imatrix not found.*llama-cpp build"):
        resolve(tree, ("llama-imatrix",))


def test_cli_refusals_are_one_line(qwen3, tmp_path: Path, capsys: pytest.CaptureFixture,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.__main__ import main

    dense_model, arch, dense_plan = qwen3  # layer 0 is dense: llama.cpp's qwen3moe cannot load it
    save_plan(dense_plan, tmp_path / "dense.json")
    model = make_tiny_model("qwen3_moe", tmp_path / "moe", config_overrides={"mlp_only_layers": []})
    plan = made_up_plan(model, formats=GGUF_FORMATS, target="llamacpp", fraction=0.5)
    save_plan(plan, tmp_path / "plan.json")
    save_plan(made_up_plan(model), tmp_path / "runtime-formats.json")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "no-llama"))
    cases = {
        "no llama.cpp": (["--model", str(model), "-o", str(tmp_path / "m.gguf")], "llama-cpp build"),
        "not a .gguf": (["--model", str(model), "-o", str(tmp_path / "m")], r"\*\.gguf"),
        "no model": (["-o", str(tmp_path / "m.gguf")], "checkpoint directory"),
        "runtime formats": (["--model", str(model), "-o", str(tmp_path / "m.gguf")], "--target llamacpp"),
        "dense layer": (["--model", str(dense_model), "-o", str(tmp_path / "m.gguf")],
                        r"qwen3moe needs an MoE block in every layer, but layers \[0\] .* are dense"),
    }
    plan_files = {"runtime formats": "runtime-formats.json", "dense layer": "dense.json"}
    capsys.readouterr()  # save_pretrained's progress bar
    for name, (args, pattern) in cases.items():
        plan_file = tmp_path / plan_files.get(name, "plan.json")
        assert main(["export", str(plan_file), "--to", "gguf", *args]) == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, (name, err)
        import re

        assert re.search(pattern, err), (name, err)
    assert not (tmp_path / "m.gguf").exists()


def test_build_reuses_a_finished_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory with the stamp of this version and every tool is reused: no download, no compiler."""
    import json
    import subprocess

    from runtime import llamacpp

    tree = fake_llama_cpp(tmp_path)
    assert not llamacpp.built(tree)
    (tree / llamacpp.STAMP).write_text(json.dumps({"version": llamacpp.PINNED_VERSION}))
    assert llamacpp.built(tree)

    def forbidden(*args, **kwargs):
        raise AssertionError("a reused build must run nothing")

    monkeypatch.setattr(subprocess, "run", forbidden)
    assert llamacpp.build(tree).tool("llama-bench") == (tree / "build" / "bin" / "llama-bench").resolve()
