"""A plan's measured cost: KL(original || plan) per token on calibration windows, the plan applied in memory.

    meter = PlanMeter(profile, Path("cache/r3"), "english:calibration", tokens=1024, window=256, progress=True)
    kl, dnll = meter.measure(plan)                      # an optimizer Plan
    kl, dnll = meter.measure_spec(top_k, pruned, formats)  # the same from its three parts

Each MoE layer routes to its top-k (``runtime.moe.set_top_k``), pruned experts are masked out
(``runtime.moe.mask_experts``, equivalent to dropping them) and every block in a quantized format is
fake-quantized (``runtime.quant.fake_quantize``), all at once; blocks in a float format (BF16, F16) keep the
checkpoint's own precision, which on the float32 reference models R3 and R4 leaves out the BF16 rounding
(``validate`` rounded them before it measured through this class: R3's uniform int2 plan read KL 12.60 then,
12.12 now; int3 to int8 moved by 0.1-4%); one full pass (embeddings included) measures the mean KL and
NLL increase per token against the reference pass. ``validate``, ``calibrate``, ``prune-curve``,
``fit-prediction`` and ``refine`` all measure through this one class.
"""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from optimizer.formats import get_format
from optimizer.plan import Plan
from optimizer.profile import Profile
from runtime.evaluate import tokenize

from .blocks import quantize_blocks, resolve_blocks
from .engine import Engine
from .measure import top_k_set
from .model_io import Runner, load_text, token_windows


class PlanMeter:
    """Measures a plan's KL on calibration windows, with the model held once in memory."""

    def __init__(self, profile: Profile, model_dir: Path, data: str, tokens: int, window: int, progress: bool):
        text, self.source = load_text(data)
        inputs, targets = token_windows(tokenize(model_dir, text), tokens, window)
        self.runner = Runner(model_dir)
        self.arch = profile.architecture
        self.refs = {r.name: r for r in resolve_blocks(self.arch, self.runner.model)}
        self.engine = Engine(self.runner, inputs, targets, progress=progress)
        self.engine.reference()

    def measure(self, plan: Plan) -> tuple[float, float]:
        """(mean KL, mean NLL increase) of ``plan`` applied in memory, nats/token."""
        pruned = {m.index: sorted(set(range(m.num_experts)) - set(plan.layer(m.index).kept_experts))
                  for m in self.arch.moe_layers}
        return self.measure_spec({lp.layer: lp.top_k for lp in plan.layers}, pruned, plan.formats)

    def measure_spec(self, top_k: dict[int, int], pruned: dict[int, list[int]],
                     formats: dict[str, str]) -> tuple[float, float]:
        """(mean KL, mean NLL increase) with each MoE layer routing to ``top_k[layer]`` experts, the experts
        ``pruned[layer]`` masked out and every block in ``formats`` fake-quantized, all at once."""
        from runtime.moe import mask_experts

        model = self.runner.model
        blocks = {b.name: b for b in self.arch.blocks}

        def apply() -> ExitStack:
            stack = ExitStack()
            for layer, k in top_k.items():
                stack.enter_context(top_k_set(model, layer, k))
            stack.enter_context(mask_experts(model, {layer: e for layer, e in pruned.items() if e}))
            items = [(self.refs[n], f) for n, f in formats.items()
                     if blocks[n].quantizable and n in self.refs and get_format(f).quantized]
            stack.enter_context(quantize_blocks(model, items))
            return stack

        effect = self.engine.evaluate_full(apply)
        return effect.kl, effect.dnll


def profile_meter(profile: Profile, details: dict | None, model_dir: Path, data: str | None = None,
                  max_tokens: int | None = None, progress: bool = True) -> PlanMeter:
    """A meter on the profile's own calibration text, tokens and window (from its details file, else its
    routing measurement; ``data`` / ``max_tokens`` override)."""
    data = data or (details or {}).get("data") or profile.experts.measurement.source or "english:calibration"
    tokens = max_tokens or (details or {}).get("tokens") or profile.experts.measurement.tokens or 4096
    return PlanMeter(profile, Path(model_dir), data, tokens, (details or {}).get("window", 256), progress)
