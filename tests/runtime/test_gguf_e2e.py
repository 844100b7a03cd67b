"""End to end in the real llama.cpp (slow): solve a tiny model of each family llama.cpp converts with a GGUF-format
profile (``--target llamacpp``), prune it by hand to 5 (grouped routers: 4) of 8 experts and top-1, export to GGUF with
``python -m runtime export --to gguf`` (types, bytes, N and k checked against the plan) and run
``llama-perplexity`` on it (finite), then ``runtime eval model.gguf --reference MODEL`` (llama.cpp's KL
divergence to the original's GGUF: finite). qwen2_moe's shared-expert gates are zeroed first, as R3's are.

Needs llama.cpp's tools (``python -m runtime llama-cpp build``) and a tokenizer llama.cpp's converter recognises:
the tiny models' byte vocabulary is not one, so the models here take SmolLM2's (``cache/r3/tokenizer.json``,
see experiments/reference_models/R3.md; ``MOECC_TEST_TOKENIZER`` names another directory). Skipped, with the
reason, when either is missing. Run: ``python -m pytest -m slow tests/runtime/test_gguf_e2e.py``.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from optimizer.errors import InputError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
GGUF_FORMATS = ("Q4_0", "Q5_0", "Q8_0", "BF16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
GLM_SPECIAL_TOKENS = ["[gMASK]", "<|user|>", "<|observation|>", "<|endoftext|>"]
#: the special tokens each converter's vocabulary reads by name (GLM's for glm4_moe and glm4_moe_lite)
SPECIAL_TOKENS = {"glm4_moe": GLM_SPECIAL_TOKENS, "glm4_moe_lite": GLM_SPECIAL_TOKENS,
                  "solar_open": ["<|endoftext|>", "<unk>", "<|startoftext|>"]}


def _llama_cpp():
    from runtime.llamacpp import resolve

    try:
        return resolve(None, ("llama-quantize", "llama-perplexity"), converter=True)
    except InputError as exc:
        pytest.skip(f"llama.cpp tools are not built: {exc}")


def _tokenizer_dir() -> Path:
    found = Path(os.environ.get("MOECC_TEST_TOKENIZER", ROOT / "cache" / "r3"))
    if not (found / "tokenizer.json").is_file():
        pytest.skip(f"no tokenizer llama.cpp's converter recognises at {found} (build cache/r3, see "
                    "experiments/reference_models/R3.md, or set MOECC_TEST_TOKENIZER)")
    return found


def _model(family: str, out: Path, tokenizer: Path, zero_gates: bool) -> Path:
    """A tiny random ``family`` model with ``tokenizer``'s vocabulary (runtime.tiny_models' shapes otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runtime.tiny_models import tiny_config

    tok = AutoTokenizer.from_pretrained(tokenizer)
    if family in SPECIAL_TOKENS:  # the converter's vocabulary reads these special tokens by name
        tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[family]})
    config = tiny_config(family)
    config.mlp_only_layers = []  # llama.cpp's qwen2moe/qwen3moe have MoE in every layer
    if family == "olmoe":  # llama.cpp's olmoe takes k_norm over the full width (real OLMoE has no GQA)
        config.num_key_value_heads = config.num_attention_heads
    config.vocab_size = len(tok)
    config.bos_token_id = tok.bos_token_id
    config.eos_token_id = tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("mlp.gate.weight"):
                    param.normal_(0.0, 0.05)
                if zero_gates and name.endswith("shared_expert_gate.weight"):
                    param.zero_()  # as R3's: llama.cpp's silu(x)/x gate would make them NaN
    model.save_pretrained(out, safe_serialization=True)
    if family in SPECIAL_TOKENS:
        tok.save_pretrained(out)
        return out
    for name in TOKENIZER_FILES:
        if (tokenizer / name).is_file():
            shutil.copyfile(tokenizer / name, out / name)
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "deepseek_v3", "glm4_moe_lite", "glm4_moe", "dots1",
                                    "solar_open", "mixtral", "olmoe"])
def test_solve_export_gguf_and_run_in_llama_cpp(family: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from optimizer.architectures import load_architecture
    from optimizer.byte_model import uniform_bytes
    from optimizer.cli import main as optimizer_main
    from optimizer.plan import load_plan, save_plan
    from optimizer.profile import save_profile
    from runtime.__main__ import main as runtime_main
    from runtime.corpora import load_corpus
    from runtime.gguf_export import check_gguf, expected_tensors
    from runtime.testing import made_up_profile, restrict_plan

    llama = _llama_cpp()
    if family == "mixtral":  # the converter's llama class tries SentencePiece first, even for tokenizer.json
        pytest.importorskip("sentencepiece", reason="llama.cpp's converter imports it for llama-arch models")
    model = _model(family, tmp_path / "model", _tokenizer_dir(), zero_gates=family == "qwen2_moe")
    arch = load_architecture(model)
    save_profile(made_up_profile(arch, GGUF_FORMATS), tmp_path / "profile.json")
    budget = int(uniform_bytes(arch, "BF16") * 0.35)
    assert optimizer_main(["solve", str(tmp_path / "profile.json"), "--target", "llamacpp", "--budget", f"{budget}B",
                           "--context", "0", "--overhead", "0", "--reproducible", "--time-limit", "60",
                           "-o", str(tmp_path / "plan.json")]) == 0
    solved = load_plan(tmp_path / "plan.json")
    assert len({f for f in solved.formats.values() if f in GGUF_FORMATS[:3]}) >= 2  # a mix of quantized types
    # the tiny experts are too small for the solver to prune at any useful budget: prune by hand (DeepSeek's
    # groups need 2 of each 4), keeping the solved formats, to exercise hf-pruned, sliced routers and N, k
    keep = [1, 3, 4, 6] if arch.expert_groups > 1 else [0, 2, 5, 6, 7]
    plan = restrict_plan(solved, arch, {m.index: (keep, 1) for m in arch.moe_layers})
    save_plan(plan, tmp_path / "pruned.json")

    out = tmp_path / "model.gguf"
    capsys.readouterr()
    assert runtime_main(["export", str(tmp_path / "pruned.json"), "--to", "gguf", "--model", str(model),
                         "-o", str(out), "--threads", "2"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "types and bytes as planned" in printed
    assert ("shared_expert_gate" in printed) == (family == "qwen2_moe")  # the nudge is announced
    check = check_gguf(out, plan, arch)  # types and bytes equal the plan
    typed = {n: e for n, e in expected_tensors(plan, arch).items() if e.type is not None and e.planned}
    assert check.planned == len(typed) and check.planned_bytes == sum(e.bytes for e in typed.values())
    assert check.expert_count == len(plan.layers[0].kept_experts) and check.expert_used_count == plan.layers[0].top_k
    assert not list(tmp_path.glob(".model.gguf.*moecc-work"))  # the work directory is removed

    text = tmp_path / "test.txt"
    text.write_text(load_corpus("english", "test")[:20000], encoding="utf-8")
    res = subprocess.run([str(llama.tool("llama-perplexity")), "-m", str(out), "-f", str(text), "-c", "128",
                          "-b", "128", "--chunks", "4", "-t", "2"], capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-2000:]
    m = re.search(r"Final estimate: PPL = ([0-9.naif+-]+)", log)
    assert m, log[-2000:]
    ppl = float(m.group(1))
    assert math.isfinite(ppl) and ppl > 1, log[-2000:]
    capsys.readouterr()
    assert runtime_main(["eval", str(out), "--reference", str(model), "--max-tokens", "512", "--window", "128",
                         "--threads", "2", "--no-bench", "--json", "--reference-cache", str(tmp_path / "ref")]) == 0
    kld = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # llama.cpp's KLD to the original's GGUF
    assert kld["windows"] == 4 and math.isfinite(kld["kl_mean"]) and 0 <= kld["kl_median"] <= kld["kl_max"]
    assert 0 < kld["top1_agreement"] <= 1 and math.isfinite(kld["reference_perplexity"])
    print(json.dumps({"family": family, "perplexity": ppl, "kl_mean": kld["kl_mean"], "experts": check.expert_count,
                      "k": check.expert_used_count,
                      "planned_tensors": check.planned, "planned_bytes": check.planned_bytes}))


def test_an_iquant_plan_gets_an_importance_matrix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A plan with IQ4_NL, exported with --calibration-text: llama-imatrix runs on the text and the GGUF keeps
    every planned type and byte."""
    from optimizer.architectures import load_architecture
    from optimizer.byte_model import uniform_bytes
    from optimizer.cli import main as optimizer_main
    from optimizer.plan import load_plan
    from optimizer.profile import save_profile
    from runtime.__main__ import main as runtime_main
    from runtime.corpora import load_corpus
    from runtime.gguf_export import check_gguf
    from runtime.testing import made_up_profile

    _llama_cpp()
    model = _model("qwen3_moe", tmp_path / "model", _tokenizer_dir(), zero_gates=False)
    arch = load_architecture(model)
    save_profile(made_up_profile(arch, ("IQ4_NL", "Q8_0", "BF16")), tmp_path / "profile.json")
    budget = int(uniform_bytes(arch, "BF16") * 0.35)
    assert optimizer_main(["solve", str(tmp_path / "profile.json"), "--target", "llamacpp", "--budget", f"{budget}B",
                           "--context", "0", "--overhead", "0", "--reproducible",
                           "-o", str(tmp_path / "plan.json")]) == 0
    plan = load_plan(tmp_path / "plan.json")
    assert "IQ4_NL" in set(plan.formats.values())
    text = tmp_path / "calibration.txt"
    text.write_text(load_corpus("english", "calibration")[:30000], encoding="utf-8")
    out = tmp_path / "model.gguf"
    capsys.readouterr()
    assert runtime_main(["export", str(tmp_path / "plan.json"), "--to", "gguf", "--model", str(model), "-o", str(out),
                         "--calibration-text", str(text), "--threads", "2"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "[export] imatrix: done" in printed and "types and bytes as planned" in printed
    assert check_gguf(out, plan, arch).planned_bytes > 0
