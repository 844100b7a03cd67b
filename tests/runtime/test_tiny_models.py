"""Tiny random MoE checkpoints: fast, loadable, seeded, structurally MoE."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from runtime.byte_tokenizer import VOCAB_SIZE, is_byte_model
from runtime.tiny_models import FAMILIES, make_tiny_model

torch.set_num_threads(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_roundtrip(family: str, tmp_path: Path) -> None:
    make_tiny_model(family, tmp_path / "warm")  # first call pays for imports
    t0 = time.perf_counter()
    out = make_tiny_model(family, tmp_path / family)
    assert time.perf_counter() - t0 < 1.0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert is_byte_model(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.model_type == family
    logits = model(input_ids=torch.randint(0, 256, (2, 12))).logits
    assert logits.shape == (2, 12, VOCAB_SIZE) and torch.isfinite(logits).all()
    gates = [n for n, _ in model.named_modules() if n.endswith("mlp.gate")]
    experts = [n for n, _ in model.named_modules() if n.endswith("mlp.experts")]
    assert gates and len(gates) == len(experts)


def test_deepseek_v3_structure(tmp_path: Path) -> None:
    cfg = AutoModelForCausalLM.from_pretrained(make_tiny_model("deepseek_v3", tmp_path)).config
    assert (cfg.n_group, cfg.topk_group, cfg.first_k_dense_replace) == (2, 1, 1)
    assert cfg.q_lora_rank and cfg.n_shared_experts == 1 and cfg.n_routed_experts == 8


def test_seeded(tmp_path: Path) -> None:
    def digest(p: Path) -> str:
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    a = make_tiny_model("mixtral", tmp_path / "a", seed=3)
    b = make_tiny_model("mixtral", tmp_path / "b", seed=3)
    c = make_tiny_model("mixtral", tmp_path / "c", seed=4)
    assert digest(a) == digest(b) != digest(c)


def test_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny_model("gpt2", tmp_path)
