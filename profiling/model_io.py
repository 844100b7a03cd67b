"""Loading a transformers MoE for profiling: calibration windows, and a layer-by-layer runner.

:class:`Runner` gives every measurement the same three steps, whatever the mode:

* :meth:`Runner.embed` turns a batch of token windows into the hidden states entering decoder layer 0,
  plus the keyword arguments (causal mask, rotary position embeddings...) the model's own forward passes to
  each decoder layer. They are captured by temporarily replacing the decoder layers with *catchers*, so
  no family-specific code rebuilds masks or rotary embeddings.
* :meth:`Runner.layer` is a context manager yielding decoder layer ``l`` with its weights present.
* :meth:`Runner.head` applies the final norm and ``lm_head``.

In memory (default) the whole model is loaded with ``from_pretrained``. **Streamed** (``--streamed``) the
model is built on the ``meta`` device; embeddings, final norm and ``lm_head`` are read from the
safetensors files once, and each decoder layer's tensors are read when the layer is entered and dropped
(back to ``meta``) when it is left, so only one decoder layer's weights are in memory at a time. The
checkpoint's per-expert tensors (``experts.{e}.gate_proj/up_proj/down_proj``, Mixtral ``w1/w3/w2`` under
``block_sparse_moe``) are fused into transformers' in-memory ``experts.gate_up_proj`` ``[E, 2I, H]`` (gate
first) and ``experts.down_proj`` ``[E, H, I]``.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from optimizer.errors import InputError
from runtime.checkpoint import checkpoint_files, load_pretrained
from runtime.layout import checkpoint_names


class ProfilingError(InputError):
    """Bad profiling input (model, data, formats); the CLI prints it on one line and exits 2."""


# ------------------------------------------------------------------------------------------ calibration
def parse_data(spec: str) -> tuple[str, str]:
    """``CORPUS[:SPLIT]`` (also ``CORPUS/SPLIT``; split defaults to ``calibration``) or a text-file path
    (split ``"file"``); :func:`runtime.corpora.parse_data_spec` with profiling's error type."""
    from runtime.corpora import CorpusError, parse_data_spec

    try:
        corpus, split = parse_data_spec(spec)
    except CorpusError as exc:
        raise ProfilingError(str(exc)) from None
    return corpus, split or "file"


def load_text(spec: str) -> tuple[str, str]:
    """Text of ``--data`` and a normalised source label (``english:calibration`` or the file path)."""
    from runtime.corpora import CorpusError, load_data_spec

    try:
        return load_data_spec(spec)
    except CorpusError as exc:
        raise ProfilingError(str(exc)) from None


def token_windows(ids: list[int], max_tokens: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows: ``inputs[i] = ids[iW:(i+1)W]``, ``targets`` shifted by one token.

    At most ``max_tokens`` scored tokens (whole windows; one shorter window if the text or the cap is
    shorter than ``window``).
    """
    if len(ids) < 2:
        raise ProfilingError("the calibration text has fewer than 2 tokens")
    if max_tokens < 1 or window < 1:
        raise ProfilingError(f"--max-tokens and --window must be positive, got {max_tokens} and {window}")
    window = min(window, max_tokens, len(ids) - 1)
    n = max(1, min((len(ids) - 1) // window, max_tokens // window))
    data = torch.tensor(ids[: n * window + 1], dtype=torch.long)
    return data[:-1].view(n, window), data[1:].view(n, window)


# ------------------------------------------------------------------------------------------ checkpoint
class Checkpoint:
    """Tensors of a ``save_pretrained`` directory (``model.safetensors`` or a sharded index), read lazily."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(self.dir / "model.safetensors", framework="pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise ProfilingError(f"{self.dir}: no model.safetensors(.index.json); --streamed reads safetensors files")
        self.weight_map: dict[str, str] = dict(weight_map)
        self._files: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        fname = self.weight_map[name]
        if fname not in self._files:
            self._files[fname] = safe_open(self.dir / fname, framework="pt")
        return self._files[fname].get_tensor(name).to(torch.float32)

    def close(self) -> None:
        """Drop the open files. ``safe_open`` memory-maps them, and every page a read touched stays mapped
        (and counted in the process's resident memory) while the handle lives: closed after each layer, a
        streamed profile holds one layer's pages, not the whole checkpoint's."""
        self._files.clear()

    def find(self, model_name: str) -> str | None:
        """The checkpoint name of an in-memory tensor name (Mixtral keeps ``block_sparse_moe`` on disk)."""
        for cand in checkpoint_names(model_name):
            if cand in self.weight_map:
                return cand
        return None


_EXPERT_FILES = {"gate": ("gate_proj", "w1"), "up": ("up_proj", "w3"), "down": ("down_proj", "w2")}


def _expert_tensor(ckpt: Checkpoint, prefix: str, num: int, which: str) -> torch.Tensor:
    """``[E, out, in]`` stack of one projection of every expert under ``prefix`` (``...mlp.experts``)."""
    for name in _EXPERT_FILES[which]:
        for pre in checkpoint_names(prefix):
            if f"{pre}.0.{name}.weight" in ckpt:
                return torch.stack([ckpt.get(f"{pre}.{e}.{name}.weight") for e in range(num)])
    raise ProfilingError(f"{ckpt.dir}: no checkpoint tensors for {prefix}.*.{which} projection")


def _checkpoint_tensor(ckpt: Checkpoint, name: str, like: torch.Tensor) -> torch.Tensor:
    found = ckpt.find(name)
    if found is not None:
        t = ckpt.get(found)
    elif name.endswith("experts.gate_up_proj"):
        prefix = name.rsplit(".", 1)[0]
        t = torch.cat([_expert_tensor(ckpt, prefix, like.shape[0], "gate"),
                       _expert_tensor(ckpt, prefix, like.shape[0], "up")], dim=1)
    elif name.endswith("experts.down_proj"):
        t = _expert_tensor(ckpt, name.rsplit(".", 1)[0], like.shape[0], "down")
    else:
        raise ProfilingError(f"{ckpt.dir}: tensor {name} is not in the checkpoint")
    if tuple(t.shape) != tuple(like.shape):
        raise ProfilingError(f"{ckpt.dir}: {name} has shape {list(t.shape)}, the model expects {list(like.shape)}")
    return t


def _load_libc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _load_libc_trim()


def release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed blocks of up to its (self-raising) mmap threshold in the heap. Streamed, every layer's
    tensors are freed when the next is loaded, and without a trim the freed, fragmented heap grew by about
    2x a layer's size per layer: on R3 the reference pass reached 1,336 MiB resident over 197 MiB of live
    tensors, 804 MiB with a trim after each layer.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _assign(root: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    path, _, attr = dotted.rpartition(".")
    mod = root.get_submodule(path) if path else root
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        mod._buffers[attr] = tensor


# ---------------------------------------------------------------------------------------------- runner
class _StopForward(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for a decoder layer: records the arguments, passes the hidden states on unchanged."""

    def __init__(self, index: int, sink: dict, last: bool, layer: nn.Module):
        super().__init__()
        self.index, self.sink, self.last = index, sink, last
        self.attention_type = getattr(layer, "attention_type", None)  # some models pick masks by it

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise ProfilingError("decoder layers called with positional arguments; unsupported model")
        if self.index == 0:
            self.sink["hidden"] = hidden_states
        self.sink[self.index] = dict(kwargs)
        if self.last:
            raise _StopForward
        return hidden_states


def run_layer(module: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = module(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Runner:
    """A causal-LM MoE split into embed / decoder layers / head; in memory or streamed from safetensors."""

    def __init__(self, model_dir: str | Path, streamed: bool = False):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.dir = Path(model_dir)
        self.streamed = streamed
        try:
            self.config = AutoConfig.from_pretrained(self.dir)
        except (OSError, ValueError, KeyError) as exc:
            raise ProfilingError(f"{self.dir}: cannot read the transformers config ({exc})") from None
        torch_dtype = torch.float32
        if streamed:
            checkpoint_files(self.dir)  # refuses a pickle-only checkpoint in one line
            self.ckpt = Checkpoint(self.dir)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self.config, dtype=torch_dtype)
            self.model = model.eval()
            self._materialize_outer()
            self.ckpt.close()
        else:
            self.model = load_pretrained(self.dir, torch_dtype)
        self.model.requires_grad_(False)
        try:
            self.layers = self.model.model.layers
        except AttributeError:
            raise ProfilingError(f"{self.dir}: model has no model.layers decoder stack; unsupported") from None
        self.num_layers = len(self.layers)

    # ----------------------------------------------------------------------------- streamed loading
    def _materialize_outer(self) -> None:
        """Load everything outside the decoder layers (embeddings, final norm, lm_head, rotary buffers)."""
        m = self.model
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        for name, p in list(m.named_parameters(remove_duplicate=False)):
            if name.startswith("model.layers."):
                continue
            if name == "lm_head.weight" and name not in self.ckpt and tied:
                m.lm_head.weight = m.model.embed_tokens.weight
                continue
            _assign(m, name, _checkpoint_tensor(self.ckpt, name, p))
        rot = getattr(m.model, "rotary_emb", None)
        if rot is not None:
            with torch.device("cpu"):
                m.model.rotary_emb = type(rot)(config=self.config)
        for name, b in m.named_buffers():
            if b.is_meta and not name.startswith("model.layers."):
                raise ProfilingError(f"streamed mode cannot materialize buffer {name}")

    def _load_layer(self, index: int) -> None:
        prefix = f"model.layers.{index}."
        layer = self.layers[index]
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            _assign(layer, name, _checkpoint_tensor(self.ckpt, prefix + name, t))
        self.ckpt.close()

    def _unload_layer(self, index: int) -> None:
        layer = self.layers[index]
        for name, t in list(layer.named_parameters()) + list(layer.named_buffers()):
            _assign(layer, name, torch.empty_like(t, device="meta"))
        release_freed_memory()

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        """Decoder layer ``index`` with its weights present (streamed: loaded now, dropped on exit)."""
        if not self.streamed:
            yield self.layers[index]
            return
        self._load_layer(index)
        try:
            yield self.layers[index]
        finally:
            self._unload_layer(index)

    # ------------------------------------------------------------------------------ embed and head
    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """Hidden states entering layer 0 and the keyword arguments of every decoder layer."""
        sink: dict = {}
        original = list(self.layers)
        n = len(original)
        for i in range(n):
            self.layers[i] = _Catcher(i, sink, i == n - 1, original[i])
        try:
            self.model.model(input_ids=input_ids, use_cache=False)
        except _StopForward:
            pass
        finally:
            for i in range(n):
                self.layers[i] = original[i]
        if "hidden" not in sink:
            raise ProfilingError("the model's forward did not reach its decoder layers")
        return sink["hidden"], [sink[i] for i in range(n)]

    @torch.no_grad()
    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (float32) from the last decoder layer's output."""
        return self.model.lm_head(self.model.model.norm(hidden)).float()
