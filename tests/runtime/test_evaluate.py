"""Evaluation harness on tiny random models."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from runtime.__main__ import main
from runtime.evaluate import EvalError, EvalResult, evaluate
from runtime.tiny_models import make_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("deepseek_v3", tmp_path_factory.mktemp("m") / "dsv3")


def test_evaluate_dir(tiny: Path) -> None:
    res = evaluate(tiny, "english", "test", max_tokens=1024, window=128)
    assert isinstance(res, EvalResult)
    assert (res.windows, res.window, res.tokens, res.bytes) == (8, 128, 1024, 1024)
    assert res.byte_tokenizer and math.isclose(res.bits_per_byte, res.bits_per_token)
    assert math.isclose(res.perplexity, 2 ** res.bits_per_token, rel_tol=1e-9)
    assert 6.0 < res.bits_per_byte < 10.0  # random init ~ log2(258)
    assert res.tokens_per_second > 0
    assert evaluate(tiny, "english", "test", max_tokens=1024, window=128).nll == res.nll


def test_evaluate_model_object_and_short_budget(tiny: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    res = evaluate(model, "code", "calibration", max_tokens=100, window=512)
    assert (res.windows, res.tokens) == (1, 100)


def test_text_file_corpus(tiny: Path, tmp_path: Path) -> None:
    f = tmp_path / "t.txt"
    f.write_text("To be, or not to be: that is the question.\n" * 4)
    res = evaluate(tiny, str(f), window=64)
    assert res.tokens == 128  # 2 windows of 64 from 176 bytes


def test_bad_inputs(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(EvalError):
        evaluate(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(EvalError):
        evaluate(tiny, str(empty))


@torch.no_grad()
def test_kl_to_the_reference_by_hand(tiny: Path) -> None:
    """KL(P_ref || P) per token, recomputed with torch's kl_div over the same windows (2 x 64 tokens)."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny).eval()
    noisy = AutoModelForCausalLM.from_pretrained(tiny).eval()
    gen = torch.Generator().manual_seed(0)
    for p in noisy.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=gen))
    res = evaluate(noisy, max_tokens=128, window=64, reference=ref)
    same = evaluate(ref, max_tokens=128, window=64, reference=ref)
    assert same.kl_mean == 0.0 and same.kl_max == 0.0 and same.top1_agreement == 1.0
    assert same.reference_perplexity == pytest.approx(same.perplexity, rel=1e-12)

    from runtime.corpora import load_corpus

    ids = torch.tensor(list(load_corpus("english", "test").encode())[:129])
    x = ids[:-1].view(2, 64)
    lp, lq = torch.log_softmax(ref(input_ids=x).logits, -1), torch.log_softmax(noisy(input_ids=x).logits, -1)
    kl = torch.nn.functional.kl_div(lq, lp, log_target=True, reduction="none").sum(-1).reshape(-1)
    agree = (lp.argmax(-1) == lq.argmax(-1)).double().mean()
    assert res.kl_mean == pytest.approx(float(kl.mean()), rel=1e-5)
    assert res.kl_median == pytest.approx(float(kl.median()), rel=1e-2)  # torch.median takes the lower middle
    assert res.kl_max == pytest.approx(float(kl.max()), rel=1e-5)
    assert res.kl_median <= res.kl_p99 <= res.kl_p999 <= res.kl_max
    assert res.top1_agreement == pytest.approx(float(agree))
    assert res.reference_perplexity == pytest.approx(same.perplexity, rel=1e-9)
    assert res.perplexity != pytest.approx(res.reference_perplexity)


def test_cli_reference(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny), "--reference", str(tiny), "--max-tokens", "128", "--window", "64",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "KL (nats)    mean 0.000000" in out and "top-1 agree  100.000%" in out
    from transformers import AutoModelForCausalLM

    from runtime.tiny_models import tiny_config

    config = tiny_config("deepseek_v3")
    config.vocab_size = 300
    with pytest.raises(EvalError, match="vocabulary of 258 tokens != the model's 300"):
        evaluate(AutoModelForCausalLM.from_config(config), max_tokens=64, window=32, reference=tiny)


def test_cli(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(tiny), "--max-tokens", "256", "--window", "128", "--json",
                 "--no-progress"]) == 0
    assert '"bits_per_byte"' in capsys.readouterr().out
    assert main(["eval", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
    assert main(["eval", str(tiny), "--corpus", "klingon", "--no-progress"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "glm4_moe", "dots1",
                                    "flex_olmo", "glm4_moe_lite", "solar_open"])
def test_expert_load(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from runtime.routing_load import expert_load, load_table

    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(family, tmp_path / family))
    loads = expert_load(model, list(range(256)) * 4, window=64)
    assert loads and all(len(ld.fractions) == 8 for ld in loads)
    assert all(abs(sum(ld.fractions) - 1.0) < 1e-9 for ld in loads)
    assert all(ld.max_over_mean >= 1.0 >= ld.min_over_mean for ld in loads)
    assert "max/mean" in load_table(loads)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_moe"])
def test_train_script_smoke(family: str, tmp_path: Path) -> None:
    """A few steps of the reference-model recipe, resume, export, then the harness reads it."""
    from experiments.reference_models.train import main as train_main

    small = ["--family", family, "--hidden", "32", "--layers", "2", "--heads", "2", "--experts", "8",
             "--topk", "2", "--n-group", "2", "--topk-group", "1", "--moe-inter", "8",
             "--dense-inter", "32", "--seq", "32", "--batch", "2", "--warmup", "1",
             "--eval-every", "0", "--threads", "1", "--out", str(tmp_path)]
    assert train_main(small + ["--steps", "2"]) == 0
    assert train_main(small + ["--steps", "3", "--resume"]) == 0
    res = evaluate(tmp_path / "final", max_tokens=64, window=32)
    assert res.byte_tokenizer and res.tokens == 64 and math.isfinite(res.bits_per_byte)
