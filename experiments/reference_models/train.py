"""Train a small byte-level MoE reference model from scratch on the English corpus.

Families: ``deepseek_v3`` (R1: MLA attention, dense first layer, sigmoid router with
expert groups + group-limited top-k, 1 shared expert) and ``qwen3_moe`` (R2:
softmax router, no shared expert).

Load balancing
    deepseek_v3: the auxiliary-loss-free update of DeepSeek-V3 (after every step,
    ``e_score_correction_bias += gamma * sign(mean_load - load)`` per MoE layer;
    transformers' code only *reads* that buffer) plus DeepSeek-V3's complementary
    sequence-wise balance loss with a small weight ``--aux-alpha``.
    qwen3_moe: transformers' Switch-style ``aux_loss`` times ``--aux-alpha``.

Determinism: fixed seed; the batch of step ``s`` is drawn from a generator seeded
with ``seed + s``, so ``--resume`` continues exactly the same data stream.
A checkpoint (model, optimizer, step, elapsed time) is written atomically to
``OUT/ckpt.pt`` every ``--ckpt-minutes``; the finished model goes to ``OUT/final``.

    nohup nice -n 19 .venv/bin/python -m experiments.reference_models.train \
        --family deepseek_v3 --out cache/r1 --steps 6000 > cache/r1_train.log 2>&1 &
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from runtime.byte_tokenizer import BOS_ID, PAD_ID, VOCAB_SIZE, save_byte_tokenizer
from runtime.corpora import load_corpus_bytes


def build_config(args: argparse.Namespace):
    """transformers config of the requested family and size."""
    common = dict(vocab_size=VOCAB_SIZE, hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.heads,
                  max_position_embeddings=max(2048, args.seq), bos_token_id=BOS_ID, eos_token_id=BOS_ID,
                  pad_token_id=PAD_ID, tie_word_embeddings=False, rms_norm_eps=1e-6,
                  initializer_range=0.02, use_cache=False)
    if args.family == "deepseek_v3":
        from transformers import DeepseekV3Config

        return DeepseekV3Config(
            **common, intermediate_size=args.dense_inter, moe_intermediate_size=args.moe_inter,
            n_routed_experts=args.experts, n_shared_experts=1, num_experts_per_tok=args.topk,
            n_group=args.n_group, topk_group=args.topk_group, first_k_dense_replace=1,
            norm_topk_prob=True, routed_scaling_factor=args.routed_scale,
            q_lora_rank=args.hidden // 2, kv_lora_rank=args.hidden // 4,
            qk_nope_head_dim=args.hidden // args.heads, qk_rope_head_dim=16,
            v_head_dim=args.hidden // args.heads, head_dim=16, rope_interleave=True)
    if args.family == "qwen3_moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(
            **common, head_dim=args.hidden // args.heads, intermediate_size=args.dense_inter,
            moe_intermediate_size=args.moe_inter, num_experts=args.experts,
            num_experts_per_tok=args.topk, norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], output_router_logits=True, router_aux_loss_coef=args.aux_alpha)
    raise SystemExit(f"unknown family {args.family!r}")


def build_model(args: argparse.Namespace):
    """Seeded random-init model for ``args``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    return AutoModelForCausalLM.from_config(build_config(args), dtype=torch.float32)


class RouterTap:
    """Forward hooks on the MoE routers: keep router logits + top-k ids of the last pass."""

    def __init__(self, model) -> None:
        self.gates = [m for n, m in model.named_modules() if n.endswith("mlp.gate")]
        self.outputs: list = [None] * len(self.gates)
        for i, gate in enumerate(self.gates):
            gate.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(_module, _inp, out):
            if isinstance(out, tuple):
                self.outputs[i] = (out[0], out[-1])  # logits, top-k indices
        return hook

    def loads(self, num_experts: int) -> torch.Tensor:
        """[layers, experts] fraction of routed slots taken by each expert in the last pass."""
        rows = [torch.bincount(idx.flatten(), minlength=num_experts).float() for _, idx in self.outputs]
        loads = torch.stack(rows)
        return loads / loads.sum(dim=1, keepdim=True)


def seq_balance_loss(tap: RouterTap, batch: int, num_experts: int, topk: int) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss, averaged over MoE layers."""
    total = 0.0
    for logits, idx in tap.outputs:
        scores = logits.sigmoid().view(batch, -1, num_experts)
        probs = scores / scores.sum(dim=-1, keepdim=True)
        seq_len = probs.shape[1]
        counts = F.one_hot(idx.view(batch, -1, topk), num_experts).sum(dim=(1, 2)).float()
        f = counts * num_experts / (topk * seq_len)
        total = total + (f * probs.mean(dim=1)).sum(dim=1).mean()
    return total / max(1, len(tap.outputs))


def get_batch(data: torch.Tensor, step: int, args: argparse.Namespace) -> torch.Tensor:
    """[batch, seq+1] byte windows for ``step`` (deterministic)."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), generator=g)
    return torch.stack([data[s:s + args.seq + 1] for s in starts.tolist()]).long()


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up then cosine decay to 10 %."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


@torch.no_grad()
def quick_bpb(model, data: torch.Tensor, seq: int, windows: int) -> float:
    """Bits per byte on the first ``windows`` non-overlapping windows of ``data``."""
    model.eval()
    n = min(windows, (len(data) - 1) // seq)
    x = data[: n * seq + 1].long()
    inp = x[:-1].view(n, seq)
    tgt = x[1:].view(n, seq)
    nll = 0.0
    for i in range(0, n, 8):
        logits = model(input_ids=inp[i:i + 8]).logits
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt[i:i + 8].reshape(-1),
                               reduction="sum").item()
    model.train()
    return nll / (n * seq) / math.log(2)


def save_final(model, out: Path, args: argparse.Namespace, summary: dict) -> Path:
    """``save_pretrained`` (safetensors) in ``--save-dtype`` + byte-tokenizer marker + summary."""
    final = out / "final"
    final.mkdir(parents=True, exist_ok=True)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.save_dtype]
    model.config.max_position_embeddings = args.seq  # the trained context; eval's default window
    model.to(dtype).save_pretrained(final, safe_serialization=True)
    model.to(torch.float32)
    save_byte_tokenizer(final)
    (final / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return final


def command_of(args: dict) -> str:
    """The training command line that reproduces a run from its stored ``vars(args)``."""
    skip = {"resume", "export_only", "probe"}
    parts = ["python -m experiments.reference_models.train"]
    for k, v in args.items():
        if k not in skip:
            parts.append(f"--{k.replace('_', '-')} {v}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Train (or probe) one reference model."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="deepseek_v3", choices=["deepseek_v3", "qwen3_moe"])
    p.add_argument("--out", type=Path, default=Path("cache/r1"))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--dense-inter", type=int, default=768)
    p.add_argument("--moe-inter", type=int, default=64)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--n-group", type=int, default=4)
    p.add_argument("--topk-group", type=int, default=2)
    p.add_argument("--routed-scale", type=float, default=1.0)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--aux-alpha", type=float, default=1e-3)
    p.add_argument("--bias-gamma", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--export-only", action="store_true",
                   help="write OUT/final from OUT/ckpt.pt without training (e.g. of an unfinished run)")
    p.add_argument("--probe", type=int, default=0, help="run this many steps, print speed, exit")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    train = torch.frombuffer(bytearray(load_corpus_bytes("english", "train")), dtype=torch.uint8)
    calib = torch.frombuffer(bytearray(load_corpus_bytes("english", "calibration")), dtype=torch.uint8)
    model = build_model(args)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,} ({n_params * 2 / 2**20:.1f} MiB bf16)", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    tap = RouterTap(model)
    step, elapsed, history = 0, 0.0, []
    train_args = dict(vars(args))
    ckpt = out / "ckpt.pt"
    if args.export_only and not ckpt.exists():
        raise SystemExit(f"{ckpt} does not exist")
    if (args.resume or args.export_only) and ckpt.exists():
        import pathlib

        # our own checkpoint: tensors, numbers and (in older files) pathlib paths; no arbitrary code
        with torch.serialization.safe_globals([pathlib.PosixPath]):
            state = torch.load(ckpt, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, elapsed, history = state["step"], state["elapsed"], state["history"]
        train_args = dict(state.get("args", train_args))
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)", flush=True)
    total_steps = step if args.export_only else (args.probe or args.steps)
    t_last_ckpt = time.time()
    t0 = time.time() - elapsed
    tokens_seen = 0
    t_run = time.time()
    while step < total_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        x = get_batch(train, step, args)
        out_ = model(input_ids=x[:, :-1])
        logits = out_.logits
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        if args.family == "deepseek_v3":
            aux = seq_balance_loss(tap, args.batch, args.experts, args.topk)
        else:
            aux = out_.aux_loss
        loss = ce + args.aux_alpha * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loads = tap.loads(args.experts)
        if args.family == "deepseek_v3":
            with torch.no_grad():
                for gate, load in zip(tap.gates, loads):
                    gate.e_score_correction_bias += args.bias_gamma * torch.sign(load.mean() - load)
        step += 1
        tokens_seen += x[:, :-1].numel()
        if step % 25 == 0 or step == total_steps:
            el = time.time() - t0
            imb = (loads.max(dim=1).values * args.experts).mean().item()
            print(f"step {step} ce {ce.item():.4f} bpb {ce.item() / math.log(2):.3f} aux {float(aux.detach()):.3f} "
                  f"maxload/mean {imb:.2f} lr {lr_at(step, args):.2e} "
                  f"tok/s {tokens_seen / (time.time() - t_run):.0f} elapsed {el / 60:.1f}m", flush=True)
        if args.eval_every and step % args.eval_every == 0 and not args.probe:
            bpb = quick_bpb(model, calib, args.seq, 64)
            history.append({"step": step, "minutes": (time.time() - t0) / 60, "calib_bpb": bpb})
            print(f"EVAL step {step} calib_bpb {bpb:.4f}", flush=True)
        if not args.probe and (time.time() - t_last_ckpt > args.ckpt_minutes * 60 or step == total_steps):
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                        "elapsed": time.time() - t0, "history": history,
                        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}, tmp)
            tmp.replace(ckpt)
            t_last_ckpt = time.time()
            print(f"checkpoint step {step}", flush=True)
    if args.probe:
        print(f"probe: {tokens_seen / (time.time() - t_run):.0f} tok/s", flush=True)
        return 0
    bpb = quick_bpb(model, calib, args.seq, 128)
    minutes = elapsed / 60 if args.export_only else (time.time() - t0) / 60
    summary = {"family": args.family, "steps": step, "train_minutes": minutes, "planned_steps": args.steps,
               "tokens": step * args.batch * args.seq, "params": n_params, "final_calib_bpb": bpb,
               "command": command_of(train_args),
               "args": {k: str(v) for k, v in train_args.items()}, "history": history,
               "expert_bias": [g.e_score_correction_bias.tolist() for g in tap.gates]
               if args.family == "deepseek_v3" else None}
    final = save_final(model, out, args, summary)
    print(f"saved {final}; calib bpb {bpb:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
