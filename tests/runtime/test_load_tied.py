"""runtime.load of a checkpoint with tied embeddings: the output head is the (dequantized) embedding."""
from __future__ import annotations

from pathlib import Path

import torch

from optimizer.plan import save_plan
from runtime.apply import apply_plan
from runtime.inmemory import compress_in_memory
from runtime.load import load
from runtime.testing import made_up_plan


def test_load_ties_the_output_head(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from runtime.tiny_models import make_tiny_model

    torch.set_num_threads(1)
    make_tiny_model("qwen2_moe", tmp_path / "tied", tie_word_embeddings=True)
    plan = made_up_plan(tmp_path / "tied", fraction=0.6)
    save_plan(plan, tmp_path / "plan.json")
    apply_plan(tmp_path / "plan.json", tmp_path / "tied", tmp_path / "out")
    model = load(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = compress_in_memory(AutoModelForCausalLM.from_pretrained(tmp_path / "tied", dtype=torch.float32), plan)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref.eval()(input_ids=ids).logits, rtol=0, atol=1e-5)
