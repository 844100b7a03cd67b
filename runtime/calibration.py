"""Calibration for GPTQ: the input Hessian ``H = 2 X^T X / N`` of every quantizable linear block.

The model runs in float32 on calibration text (``--data``, default ``english:calibration``; ``--calib-tokens``
tokens, default 2048, in non-overlapping windows of the model's trained context as :mod:`runtime.evaluate`
uses) with forward pre-hooks that accumulate ``X^T X`` over the rows ``x`` entering each block:

* attention projections, dense and shared MLPs, lm_head: the ``nn.Linear`` module's input, all N tokens;
* routed experts (transformers 5 fused layout, ``experts(hidden_states, top_k_index, top_k_weights)``): for
  expert e only the ``N_e`` tokens routed to it; ``gate_proj``/``up_proj`` (fused ``gate_up_proj``
  ``[E, 2I, H]``) see the hidden state ``x``, ``down_proj`` sees ``act(gate x) * up x`` computed with the
  expert's own weights. Rows are not weighted by the routing weight (each expert's projections see their
  routed tokens, as hooks on per-expert linear modules do; weighting by g^2 measured no better on R3).
  An expert that got no token gets ``H = I``, for which GPTQ reduces to RTN exactly.

Two orders:

* :func:`gptq_sequential` (the default of ``apply``, as GPTQModel and llm-compressor do): decoder layer by
  decoder layer, a forward pass that stops after layer L collects L's Hessians on the inputs produced by the
  already GPTQ-quantized layers before it, then L is fake-quantized in memory; lm_head last.
* :func:`collect_hessians` alone (``--calib-one-pass``): every Hessian from the unquantized model in one pass;
  ~L/2 times cheaper, measurably worse (docs/runtime.md, "GPTQ").

:func:`calibrate_plan` routes as the plan will (pruned experts masked, per-layer top-k set), so experts see
the tokens they will serve. Memory: ``in x in`` float32 per linear input, ``[E, H, H]`` and ``[E, I, I]``
per MoE layer, plus the float32 model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from optimizer.errors import InputError
from optimizer.model_spec import Block, BlockKind

from .evaluate import DEFAULT_WINDOW, tokenize
from .layout import expert_view, fused_param, in_memory_name
from .moe import get_layer
from .quant.gptq import DEFAULT_PERCDAMP

__all__ = ["DEFAULT_DATA", "DEFAULT_CALIB_TOKENS", "GPTQ_KINDS", "Calibration", "Hessians", "parse_data",
           "calibration_inputs", "collect_hessians", "gptq_sequential", "calibrate_plan"]

DEFAULT_DATA = "english:calibration"
DEFAULT_CALIB_TOKENS = 2048
#: block kinds whose input is a linear layer's input (embeddings and routers are not calibrated)
GPTQ_KINDS = frozenset({BlockKind.ATTENTION, BlockKind.DENSE_MLP, BlockKind.SHARED_EXPERT,
                        BlockKind.ROUTED_EXPERT, BlockKind.LM_HEAD})


@dataclass(frozen=True)
class Calibration:
    """Where the Hessians came from (recorded in the compressed checkpoint's manifest)."""

    source: str  # "english:calibration" or a text file path
    tokens: int  # tokens actually fed
    window: int
    windows: int
    sequential: bool = True

    def to_json(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "window": self.window, "windows": self.windows,
                "order": "sequential" if self.sequential else "one-pass"}


def parse_data(spec: str) -> tuple[str, str | None]:
    """``CORPUS[:SPLIT]`` (split defaults to ``calibration``) -> (corpus, split); a text file -> (path, None).
    :func:`runtime.corpora.parse_data_spec` raising InputError."""
    from .corpora import CorpusError, parse_data_spec

    try:
        return parse_data_spec(spec)
    except CorpusError as exc:
        raise InputError(str(exc)) from None


def _load_text(spec: str) -> tuple[str, str]:
    from .corpora import CorpusError, load_data_spec

    try:
        return load_data_spec(spec)
    except CorpusError as exc:
        raise InputError(str(exc)) from None


def calibration_inputs(model: nn.Module, model_dir: str | Path | None, spec: str = DEFAULT_DATA,
                       tokens: int = DEFAULT_CALIB_TOKENS, window: int | None = None
                       ) -> tuple[torch.Tensor, Calibration]:
    """Token windows ``[n, W]`` of the first ``tokens`` tokens of ``spec`` (fewer if the text is shorter).

    ``window`` defaults to ``min(512, config.max_position_embeddings)`` (the trained context), as in
    :func:`runtime.evaluate.evaluate`. Raises InputError on an unknown corpus, empty text or bad numbers.
    """
    if tokens < 1:
        raise InputError(f"--calib-tokens must be positive, got {tokens}")
    text, source = _load_text(spec)
    ids = tokenize(Path(model_dir) if model_dir else None, text)
    if len(ids) < 2:
        raise InputError(f"--data {spec!r}: fewer than 2 calibration tokens")
    limit = getattr(model.config, "max_position_embeddings", None) or DEFAULT_WINDOW
    window = min(window or min(DEFAULT_WINDOW, limit), tokens, len(ids))
    n = max(1, min(len(ids) // window, tokens // window))
    inputs = torch.tensor(ids[:n * window], dtype=torch.long).view(n, window)
    return inputs, Calibration(source, n * window, window, n)


@dataclass
class Hessians:
    """Accumulated ``sum x x^T`` and token counts per calibrated input, keyed by in-memory parameter name.

    Keys: ``<module>.weight`` for linear modules (``[in, in]``, count scalar); ``<experts>.gate_up_proj`` and
    ``<experts>.down_proj`` for fused experts (``[E, in, in]``, counts ``[E]``).
    """

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: dict[str, tuple[str, int | None]] = field(default_factory=dict)  # block name -> (key, expert)

    def add(self, key: str, x: torch.Tensor, expert: int | None = None, experts: int = 0) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        if key not in self.sums:
            n = x.shape[-1]
            self.sums[key] = torch.zeros((experts, n, n) if expert is not None else (n, n))
            self.counts[key] = torch.zeros(experts if expert is not None else (), dtype=torch.long)
        target = self.sums[key] if expert is None else self.sums[key][expert]
        target.addmm_(x.T, x)
        if expert is None:
            self.counts[key] += x.shape[0]
        else:
            self.counts[key][expert] += x.shape[0]

    def for_param(self, key: str) -> torch.Tensor | None:
        """``2 X^T X / N`` (``[in, in]``, or ``[E, in, in]`` with ``I`` for experts that got no token); None if
        the input was never seen."""
        if key not in self.sums or (self.counts[key].dim() == 0 and int(self.counts[key]) == 0):
            return None
        s, n = self.sums[key], self.counts[key]
        h = s * (2.0 / n.clamp(min=1).to(s.dtype))[..., None, None]
        empty = n == 0
        if bool(empty.any()):
            eye = torch.eye(s.shape[-1], dtype=s.dtype)
            h = torch.where(empty[..., None, None], eye, h)
        return h

    def for_block(self, name: str) -> torch.Tensor | None:
        """The ``[in, in]`` Hessian of checkpoint block ``name`` (a routed expert's slice of its layer's)."""
        if name not in self.blocks:
            return None
        key, expert = self.blocks[name]
        if key not in self.sums:
            return None
        s, n = self.sums[key], self.counts[key]
        if expert is None:
            return s * (2.0 / max(int(n), 1)) if int(n) else None
        if int(n[expert]) == 0:
            return torch.eye(s.shape[-1], dtype=s.dtype)
        return s[expert] * (2.0 / int(n[expert]))


def _expert_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden_states`` and ``top_k_index`` of ``experts(hidden_states, top_k_index, top_k_weights)``."""
    names = ("hidden_states", "top_k_index")
    vals = list(args[:2]) + [kwargs[n] for n in names[len(args[:2]):]]
    return vals[0], vals[1]


def _block_key(block: Block, model: nn.Module) -> tuple[str, int | None] | None:
    """(Hessian key, expert index) of a checkpoint block in ``model``; None if it is no linear input."""
    if block.kind not in GPTQ_KINDS or len(block.shape) != 2:
        return None
    if block.is_routed_expert:
        return f"{get_layer(model, block.layer).name}.experts.{fused_param(block.projection)}", block.expert
    path = in_memory_name(block.name)
    module_path, _, attr = path.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return None
    if attr != "weight" or not isinstance(module, nn.Linear) or tuple(module.weight.shape) != tuple(block.shape):
        return None
    return path, None


class _Stop(Exception):
    """Ends a partial forward pass (raised by a hook after the last layer of interest)."""


def _decoder_layer(model: nn.Module, index: int) -> nn.Module:
    for name, module in model.named_modules():
        m = re.search(r"(?:^|\.)layers\.(\d+)$", name)
        if m and int(m.group(1)) == index:
            return module
    raise InputError(f"{type(model).__name__} has no decoder layer {index}")


@torch.no_grad()
def collect_hessians(model: nn.Module, inputs: torch.Tensor, blocks: Iterable[Block] | None = None,
                     batch_size: int = 8, progress: bool = False, stop_after: int | None = None) -> Hessians:
    """Run ``model`` on ``inputs`` ``[n, W]`` and accumulate the Hessians of ``blocks`` (default: every block
    of the model's architecture of a :data:`GPTQ_KINDS` kind). Blocks that are no linear input are left out.
    ``stop_after``: end each forward pass after that decoder layer."""
    from .inmemory import model_architecture
    from .moe import moe_layers

    if blocks is None:
        blocks = model_architecture(model).blocks
    hs = Hessians()
    for block in blocks:
        key = _block_key(block, model)
        if key is not None:
            hs.blocks[block.name] = key
    keys = {k for k, _ in hs.blocks.values()}
    handles = []

    def linear_hook(key: str):
        def hook(_module, args, kwargs):
            hs.add(key, args[0] if args else kwargs["input"])
        return hook

    def experts_hook(prefix: str, num: int, want_gate_up: bool, want_down: bool):
        def hook(module, args, kwargs):
            x, idx = _expert_call(args, kwargs)
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
            inter = module.down_proj.shape[-1]
            for e in torch.unique(idx).tolist():
                tok = torch.where(idx == e)[0]  # a token picks an expert at most once
                xe = x[tok]
                if want_gate_up:
                    hs.add(f"{prefix}.gate_up_proj", xe, e, num)
                if want_down:
                    gate_up = nn.functional.linear(xe, module.gate_up_proj[e].float())
                    hs.add(f"{prefix}.down_proj", module.act_fn(gate_up[:, :inter]) * gate_up[:, inter:], e, num)
        return hook

    try:
        for h in (moe_layers(model) if any(not k.endswith(".weight") for k in keys) else []):
            prefix = f"{h.name}.experts"
            gu, down = f"{prefix}.gate_up_proj" in keys, f"{prefix}.down_proj" in keys
            if gu or down:
                handles.append(h.experts.register_forward_pre_hook(
                    experts_hook(prefix, h.num_experts, gu, down), with_kwargs=True))
        for key in sorted(keys):
            if key.endswith(".weight"):
                handles.append(model.get_submodule(key[:-len(".weight")]).register_forward_pre_hook(
                    linear_hook(key), with_kwargs=True))
        if stop_after is not None:
            def stop(*_):
                raise _Stop
            handles.append(_decoder_layer(model, stop_after).register_forward_hook(stop))
        from tqdm.auto import tqdm

        bar = tqdm(total=inputs.numel(), unit="tok", desc="calibrate", disable=not progress)
        for start in range(0, inputs.shape[0], batch_size):
            x = inputs[start:start + batch_size]
            try:
                model(input_ids=x)
            except _Stop:
                pass
            bar.update(x.numel())
        bar.close()
    finally:
        for handle in handles:
            handle.remove()
    return hs


def _gptq_blocks(model: nn.Module, formats: Mapping[str, str]) -> list[Block]:
    """The blocks of ``formats`` GPTQ applies to: a linear input and an int storage format."""
    from optimizer.formats import INT_FAMILY, get_format

    from .inmemory import model_architecture
    from .quant import storage_format

    return [b for b in model_architecture(model).blocks if b.name in formats and _block_key(b, model) is not None
            and get_format(storage_format(formats[b.name], b.shape)[0]).family == INT_FAMILY]


def _block_tensor(model: nn.Module, block: Block, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
    """The in-memory view of a checkpoint block (a routed expert's slice of the fused tensors); None if absent
    (a tied lm_head)."""
    if block.is_routed_expert:
        return expert_view(model, block.layer, block.expert, block.projection)
    return params.get(in_memory_name(block.name))


@torch.no_grad()
def gptq_sequential(model: nn.Module, inputs: torch.Tensor, formats: Mapping[str, str],
                    percdamp: float = DEFAULT_PERCDAMP, progress: bool = False) -> Hessians:
    """Layer-by-layer GPTQ in memory; leaves ``model`` fake-quantized as ``formats`` (block -> format) says and
    returns the Hessians used, from which ``quantize(..., "gptq")`` reproduces each block's codes exactly.

    Blocks that GPTQ does not apply to (no linear input, or a non-int storage format) are fake-quantized
    first (``rtn`` / the format's own quantizer). Then per decoder layer L, in order: a forward pass stopping
    after L collects L's Hessians, whose inputs went through the quantized layers < L, and L's int blocks
    are GPTQ-quantized in place; blocks outside the decoder layers (lm_head) come last, after a full pass.
    Expert indices are the model's (mask pruned experts, do not drop them).
    """
    from tqdm.auto import tqdm

    from .inmemory import model_architecture
    from .quant import fake_quantize, quantize

    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    blocks = [b for b in model_architecture(model).blocks if b.name in formats]
    later = _gptq_blocks(model, formats)
    names = {b.name for b in later}
    for b in blocks:
        t = _block_tensor(model, b, params) if b.name not in names else None
        if t is not None:
            t.copy_(fake_quantize(t, formats[b.name]))
    steps = sorted({b.layer for b in later if b.layer is not None})
    steps += [None] if any(b.layer is None for b in later) else []
    hs = Hessians()
    for step in tqdm(steps, desc="gptq layers", disable=not progress):
        group = [b for b in later if b.layer == step]
        part = collect_hessians(model, inputs, group, stop_after=step)
        hs.sums.update(part.sums)
        hs.counts.update(part.counts)
        hs.blocks.update(part.blocks)
        for b in group:
            t, h = _block_tensor(model, b, params), part.for_block(b.name)
            if t is not None and h is not None:
                t.copy_(quantize(t, formats[b.name], "gptq", hessian=h, percdamp=percdamp).dequantize(t.dtype))
    return hs


def calibrate_plan(model_dir: str | Path, layers: Mapping[int, tuple[Sequence[int], int]], formats: Mapping[str, str],
                   spec: str = DEFAULT_DATA, tokens: int = DEFAULT_CALIB_TOKENS, progress: bool = False,
                   sequential: bool = True) -> tuple[Hessians, Calibration]:
    """GPTQ Hessians for the blocks of ``formats`` (block -> planned format) of the checkpoint ``model_dir``.

    ``layers``: per MoE layer the kept (original) experts and top-k (``runtime.apply.validate_layers``);
    pruned experts are masked (:func:`runtime.moe.mask_experts`, equivalent to dropping them, indices kept)
    and the top-k is set before the pass. ``sequential``: :func:`gptq_sequential`, else one pass of
    :func:`collect_hessians` over the int-format blocks. The model is loaded in float32 and released afterwards.
    """
    from .evaluate import load_model
    from .moe import get_layer, mask_experts, set_top_k

    parse_data(spec)  # fail on a bad --data before loading the model
    if tokens < 1:
        raise InputError(f"--calib-tokens must be positive, got {tokens}")
    model = load_model(model_dir)
    inputs, calib = calibration_inputs(model, model_dir, spec, tokens)
    masked = {}
    for layer, (keep, k) in layers.items():
        set_top_k(model, layer, k)
        pruned = sorted(set(range(get_layer(model, layer).num_experts)) - set(keep))
        if pruned:
            masked[layer] = pruned
    with mask_experts(model, masked):
        if sequential:
            hs = gptq_sequential(model, inputs, formats, progress=progress)
        else:
            hs = collect_hessians(model, inputs, _gptq_blocks(model, formats), progress=progress)
    del model
    return hs, Calibration(calib.source, calib.tokens, calib.window, calib.windows, sequential)
