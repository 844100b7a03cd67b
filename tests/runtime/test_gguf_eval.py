"""``runtime eval model.gguf``: llama-perplexity's KL summary parsed, the reference converted and its
log-probabilities computed once (cached), refusals on one line.

The flow runs against stand-in tools that print what the real ones print (the summary in
``data/llama_perplexity_kld.txt`` is a real ``llama-perplexity --kl-divergence`` run on a tiny qwen2_moe) and
log how they were called; the real llama.cpp run is in the slow ``test_gguf_e2e.py``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from runtime.gguf_eval import evaluate_gguf, parse_bench_json, parse_kld_output
from runtime.llamacpp import TOOLS

DATA = Path(__file__).parent / "data"
KLD_TEXT = (DATA / "llama_perplexity_kld.txt").read_text(encoding="utf-8")

PERPLEXITY = f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps(["llama-perplexity", *args]) + "\\n")
if "--kl-divergence" in args:
    sys.stdout.write(open(os.environ["FAKE_KLD"]).read())
else:
    open(args[args.index("--kl-divergence-base") + 1], "wb").write(b"logits")
    print("[1]10.5,[2]10.4,")
"""
BENCH = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps(["llama-bench", *sys.argv[1:]]) + "\\n")
print("build: ...")
print(json.dumps([{{"n_prompt": 0, "n_gen": 32, "avg_ts": 123.5, "stddev_ts": 1.0}}]))
"""
CONVERTER = """import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as fh:
    fh.write(json.dumps(["convert", *args, sorted(os.listdir(args[0]))]) + "\\n")
open(args[args.index("--outfile") + 1], "wb").write(b"GGUF" + bytes(12))
"""


@pytest.fixture
def tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A llama.cpp tree whose tools log their arguments to ``FAKE_LOG``; returns the log."""
    tree = tmp_path / "llama.cpp"
    (tree / "build" / "bin").mkdir(parents=True)
    for name in TOOLS:
        text = {"llama-perplexity": PERPLEXITY, "llama-bench": BENCH}.get(name, "#!/bin/sh\nexit 1\n")
        (tree / "build" / "bin" / name).write_text(text)
        (tree / "build" / "bin" / name).chmod(0o755)
    (tree / "convert_hf_to_gguf.py").write_text(CONVERTER)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("MOECC_LLAMA_CPP", str(tree))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_KLD", str(DATA / "llama_perplexity_kld.txt"))
    return log


def _calls(log: Path) -> list[list]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _gguf(path: Path) -> Path:
    path.write_bytes(b"GGUF" + bytes(28))
    return path


def test_kld_summary_is_parsed_from_llama_perplexity_output() -> None:
    values = parse_kld_output(KLD_TEXT)
    assert values == {"perplexity": 47940.677746, "reference_perplexity": 48437.319233, "kl_mean": 0.000379,
                      "kl_max": 0.000518, "kl_p999": 0.000507, "kl_p99": 0.000472, "kl_median": 0.000376,
                      "top1_agreement": pytest.approx(0.75397), "windows": 8, "window": 128}


def test_an_incomplete_kld_output_names_what_is_missing() -> None:
    cut = KLD_TEXT[: KLD_TEXT.index("====== KL divergence statistics")]
    with pytest.raises(RuntimeError, match="printed no kl_mean, kl_max, kl_p999, kl_p99, kl_median, top1_agreement"):
        parse_kld_output(cut)


def test_bench_json_gives_the_decode_test() -> None:
    rows = [{"n_prompt": 512, "n_gen": 0, "avg_ts": 900.0}, {"n_prompt": 0, "n_gen": 32, "avg_ts": 41.25}]
    assert parse_bench_json("build: x\n" + json.dumps(rows)) == 41.25
    with pytest.raises(RuntimeError, match="no decode test"):
        parse_bench_json(json.dumps(rows[:1]))


def test_a_reference_gguf_is_scored_once_and_its_logits_reused(tools: Path, tmp_path: Path) -> None:
    model, ref, cache = _gguf(tmp_path / "plan.gguf"), _gguf(tmp_path / "ref.gguf"), tmp_path / "cache"
    res = evaluate_gguf(model, ref, max_tokens=1000, window=128, threads=2, cache=cache)
    # 1000 // 128 = 7 windows asked; the summary is the one of the stored real run (8 windows of 128)
    assert (res.kl_mean, res.kl_p99, res.windows, res.window) == (0.000379, 0.000472, 8, 128)
    assert res.tokens == 8 * (128 - 1 - 64) and res.top1_agreement == pytest.approx(0.75397)
    assert res.decode_tokens_per_second == res.reference_decode_tokens_per_second == 123.5
    calls = _calls(tools)
    base = [c for c in calls if c[0] == "llama-perplexity" and "--kl-divergence" not in c]
    assert len(base) == 1 and base[0][base[0].index("--chunks") + 1] == "7"
    assert base[0][base[0].index("-c") + 1] == base[0][base[0].index("-b") + 1] == "128"
    assert [c[c.index("-m") + 1] for c in calls if c[0] == "llama-bench"] == [str(model), str(ref)]
    kld = [c for c in calls if "--kl-divergence" in c][0]
    assert kld[kld.index("-m") + 1] == str(model) and Path(kld[kld.index("--kl-divergence-base") + 1]).parent == cache

    evaluate_gguf(model, ref, max_tokens=1000, window=128, threads=2, cache=cache, bench=False)
    again = _calls(tools)[len(calls):]
    assert [c[0] for c in again] == ["llama-perplexity"] and "--kl-divergence" in again[0]  # logits reused, no bench
    evaluate_gguf(model, ref, max_tokens=2000, window=128, threads=2, cache=cache, bench=False)
    assert sum("--kl-divergence" not in c for c in _calls(tools) if c[0] == "llama-perplexity") == 2  # other windows


def test_a_checkpoint_reference_is_converted_once_with_its_gates_nudged(tools: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from runtime.byte_tokenizer import save_byte_tokenizer
    from runtime.tiny_models import tiny_config

    config = tiny_config("qwen2_moe")
    config.mlp_only_layers = []  # llama.cpp's qwen2moe has MoE in every layer
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in original.named_parameters():
            if name.endswith("shared_expert_gate.weight"):
                param.zero_()  # as R3's: llama.cpp would compute NaN from them
    ckpt = tmp_path / "original"
    original.save_pretrained(ckpt, safe_serialization=True)
    save_byte_tokenizer(ckpt)
    model, cache = _gguf(tmp_path / "plan.gguf"), tmp_path / "cache"
    evaluate_gguf(model, ckpt, max_tokens=256, window=64, cache=cache, bench=False)
    converts = [c for c in _calls(tools) if c[0] == "convert"]
    assert len(converts) == 1
    source, files = Path(converts[0][1]), converts[0][-1]
    assert source != ckpt and "model.safetensors" in files and "config.json" in files  # a nudged copy
    assert converts[0][converts[0].index("--outtype") + 1] == "f32"  # the tiny checkpoint is float32
    assert len(list(cache.glob("original-f32-*.gguf"))) == 1 and not list(cache.glob(".reference-*"))

    evaluate_gguf(model, ckpt, max_tokens=256, window=64, cache=cache, bench=False)
    assert len([c for c in _calls(tools) if c[0] == "convert"]) == 1  # the cached GGUF is reused


def test_cli_refusals_are_one_line(tools: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from runtime.__main__ import main

    model, not_gguf = _gguf(tmp_path / "plan.gguf"), tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    cases = [([str(not_gguf), "--reference", str(model)], "not a GGUF file"),
             ([str(model)], "give --reference"),
             ([str(model), "--reference", str(not_gguf)], "--reference"),
             ([str(model), "--reference", str(tmp_path)], "no config.json"),
             ([str(model), "--reference", str(model), "--max-tokens", "100", "--window", "128"],
              "--max-tokens 100 is below one window of 128 tokens")]
    for argv, expected in cases:
        assert main(["eval", *argv, "--reference-cache", str(tmp_path / "cache")]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], (argv, err)
    assert not [c for c in _calls(tools) if "--kl-divergence" in c]  # refused before any run


def test_the_reference_checkpoint_keeps_every_expert_unties_the_head_and_nudges_zero_gates(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from optimizer.architectures import load_architecture
    from runtime.prune_checkpoint import ZERO_GATE_NUDGE, write_reference_checkpoint
    from runtime.tiny_models import make_tiny_model

    ckpt = make_tiny_model("qwen2_moe", tmp_path / "original")
    config = json.loads((ckpt / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (ckpt / "config.json").write_text(json.dumps(config))
    weights = {n: t for n, t in load_file(str(ckpt / "model.safetensors")).items() if n != "lm_head.weight"}
    gate = next(n for n in weights if n.endswith("shared_expert_gate.weight"))
    weights[gate] = torch.zeros_like(weights[gate])
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})

    out = write_reference_checkpoint(load_architecture(ckpt), ckpt, tmp_path / "ref", untie_embeddings=True).out
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(weights) | {"lm_head.weight"}  # every expert, plus the head llama.cpp needs
    assert torch.equal(written["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert torch.all(written[gate] == ZERO_GATE_NUDGE)
    assert all(torch.equal(written[n], t) for n, t in weights.items() if n != gate)
    new = json.loads((out / "config.json").read_text())
    assert new["num_experts"] == config["num_experts"] and new["num_experts_per_tok"] == config["num_experts_per_tok"]
    assert new["tie_word_embeddings"] is False and new["moecc_pruned"]["reference"] is True
