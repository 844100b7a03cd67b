"""Copy a finished training run into ``models/NAME`` and write its model card.

    .venv/bin/python -m experiments.reference_models.make_card cache/r1/final \
        models/r1-deepseek-v3-tiny --title "R1: DeepSeek-V3-architecture byte-level MoE"

Measures test bits/byte with the evaluation harness (window = training sequence
length), the unigram and ``xz -9e`` baselines on the same split, and the
per-layer expert load on the first 64 Ki test bytes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from runtime.corpora import load_corpus_bytes
from runtime.evaluate import evaluate, load_model
from runtime.routing_load import expert_load, load_table

from .baselines import baselines

FILES = ("config.json", "generation_config.json", "model.safetensors", "byte_tokenizer.json",
         "training_summary.json")


def arch_lines(cfg) -> list[str]:
    """Human-readable architecture summary from a config."""
    d = cfg.to_dict()
    keys = ["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
            "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_experts", "num_local_experts",
            "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "first_k_dense_replace",
            "q_lora_rank", "kv_lora_rank", "norm_topk_prob", "routed_scaling_factor"]
    return [f"| {k} | {d[k]} |" for k in keys if k in d and d[k] is not None]


def main(argv: list[str] | None = None) -> int:
    """Copy files, measure, write README.md and metrics.json."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("dest", type=Path)
    p.add_argument("--title", default="Reference MoE model")
    p.add_argument("--window", type=int, default=None, help="default: the trained context")
    p.add_argument("--max-tokens", type=int, default=None)
    args = p.parse_args(argv)
    args.dest.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        if (args.run_dir / f).exists():
            shutil.copy2(args.run_dir / f, args.dest / f)
    summary = json.loads((args.dest / "training_summary.json").read_text())
    seq = int(summary.get("args", {}).get("seq", 0) or 0)
    cfg_path = args.dest / "config.json"
    cfg_json = json.loads(cfg_path.read_text())
    if seq and cfg_json.get("max_position_embeddings") != seq:  # record the trained context
        cfg_json["max_position_embeddings"] = seq
        cfg_path.write_text(json.dumps(cfg_json, indent=2, sort_keys=True) + "\n")
    res = evaluate(args.dest, "english", "test", args.max_tokens, args.window, progress=True)
    base = baselines("english", "test")
    model = load_model(args.dest)
    loads = expert_load(model, list(load_corpus_bytes("english", "test")), window=res.window)
    size_mb = (args.dest / "model.safetensors").stat().st_size / 1e6
    metrics = {"test": json.loads(res.to_json()), "baselines": base, "safetensors_mb": size_mb,
               "expert_load": [{"layer": ld.layer, "max_over_mean": ld.max_over_mean,
                                "min_over_mean": ld.min_over_mean, "entropy": ld.normalized_entropy}
                               for ld in loads]}
    (args.dest / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    hist = summary.get("history") or []
    curve = ", ".join(f"{h['step']}: {h['calib_bpb']:.3f}" for h in hist[:: max(1, len(hist) // 8)])
    dtype = json.loads((args.dest / 'config.json').read_text()).get('dtype', '?')
    ours = f"**{res.bits_per_byte:.3f}** (perplexity {res.perplexity:.2f})"
    card = f"""# {args.title}

Byte-level MoE trained from scratch on CPU by `experiments/reference_models/train.py`
on the English train split of `runtime.corpora` (Shakespeare, Milton, King James Bible).
Random init, seed and data order fixed; weights stored as {dtype} safetensors ({size_mb:.1f} MB).

## Test split (english/test, {base['bytes']:,} bytes)

| model | bits/byte |
|---|---|
| this model (window {res.window}, {res.tokens:,} bytes scored) | {ours} |
| byte unigram (fit on train) | {base['unigram_bpb']:.3f} |
| `xz -9e` of the test split | {base['xz9_bpb']:.3f} |

Forward pass: {res.tokens_per_second:,.0f} tokens/s (float32, CPU, shared 2-core machine).
Re-measure: `.venv/bin/python -m runtime eval {args.dest}` (window = trained context
{res.window} = `max_position_embeddings`; longer windows are out of distribution for RoPE).

## Architecture

| field | value |
|---|---|
{chr(10).join(arch_lines(model.config))}

Parameters: {summary.get('params', 0):,}.

## Expert load on the test split (first 64 Ki bytes; 1.0 = uniform)

{load_table(loads)}

## Training

- steps {summary.get('steps')}, tokens {summary.get('tokens', 0):,}, wall time {summary.get('train_minutes', 0):.1f} min
  (nice 19 on a 2-core machine shared with other jobs, 1 torch thread).
- calibration bits/byte by step: {curve}
- command: `{summary.get('command')}`
- load balancing: DeepSeek-V3 auxiliary-loss-free bias update of `e_score_correction_bias`
  plus a small sequence-wise balance loss (DeepSeek family); Switch aux loss (Qwen family).
"""
    (args.dest / "README.md").write_text(card)
    print(card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
