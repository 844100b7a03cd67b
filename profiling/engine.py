"""Layer-major evaluation: one reference pass, then the loss of many single perturbations.

The calibration windows are cut into batches. The reference pass runs decoder layer by decoder layer over
*all* batches (so a streamed model loads each layer once) and keeps the hidden states entering every layer,
the reference log-probabilities and the per-token negative log-likelihood.

A :class:`Perturbation` changes the model from one step on (``-1`` = embeddings, ``l`` = decoder layer ``l``,
``num_layers`` = final norm / lm_head): its context manager is entered only while that step runs, so the
unchanged earlier layers are never recomputed. Perturbations that start at the same step are propagated
together through the remaining layers, in chunks whose hidden states fit ``state_budget_bytes`` (in memory
the chunk size changes nothing but memory; streamed, each chunk reloads the layers after its start). For each
perturbation :meth:`Engine.evaluate` returns the mean NLL increase (nats/token) and the mean per-token
KL(reference || perturbed), both over every calibration token.
"""
from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, Hashable, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .blocks import EMBED_STEP
from .model_io import Runner, run_layer


@dataclass(frozen=True)
class Perturbation:
    key: Hashable
    step: int
    apply: Callable[[], AbstractContextManager]


@dataclass(frozen=True)
class Effect:
    dnll: float  # mean NLL increase, nats/token (may be negative)
    kl: float  # mean KL(reference || perturbed), nats/token


class Engine:
    def __init__(self, runner: Runner, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 8,
                 state_budget_bytes: int = 1 << 30, progress: bool = True, head_chunk_bytes: int = 64 << 20):
        self.runner = runner
        self.inputs, self.targets = inputs, targets
        self.batches = [slice(i, min(i + batch_size, len(inputs))) for i in range(0, len(inputs), batch_size)]
        self.tokens = int(targets.numel())
        self.state_budget_bytes = state_budget_bytes
        self.progress = progress
        self.head_chunk_bytes = head_chunk_bytes
        self.journal = None  # a profiling.journal.Journal: effects already measured / to record
        self.hidden: list[list[torch.Tensor]] = []  # hidden[l][b]: input of layer l (l = L: last output)
        self.kwargs: list[list[dict]] = []  # kwargs[b][l]
        self.ref_logp: list[torch.Tensor] = []
        self.ref_nll = 0.0
        self.layer_seconds: list[dict[str, float]] = []  # reference pass, per decoder layer: load/forward/...
        self.head_seconds = 0.0  # reference pass: final norm, lm_head, log-softmax (and the head's statistics)

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, dynamic_ncols=True)

    # ------------------------------------------------------------------------------------ reference
    @torch.no_grad()
    def reference(self, on_layer: Callable[[int, torch.nn.Module], Callable[[], None]] | None = None,
                  on_head: Callable[[], Callable[[], None]] | None = None) -> None:
        """Run the unchanged model; ``on_layer(l, module)`` may attach hooks and returns a function that
        finishes the layer (called after all batches, while the layer's weights are still present)."""
        L = self.runner.num_layers
        h0, self.kwargs = [], []
        for b in self.batches:
            h, kw = self.runner.embed(self.inputs[b])
            h0.append(h)
            self.kwargs.append(kw)
        self.hidden = [h0]
        bar = self._bar(L, "reference pass")
        self.layer_seconds = []
        for layer in range(L):
            t0 = time.perf_counter()
            with self.runner.layer(layer) as mod:
                t1 = time.perf_counter()
                done = on_layer(layer, mod) if on_layer else None
                self.hidden.append([run_layer(mod, h, self.kwargs[i][layer])
                                    for i, h in enumerate(self.hidden[layer])])
                t2 = time.perf_counter()
                if done:
                    done()
                t3 = time.perf_counter()
            self.layer_seconds.append({"load": t1 - t0, "forward": t2 - t1, "statistics": t3 - t2,
                                       "unload": time.perf_counter() - t3})
            bar.update()
        bar.close()
        t_head = time.perf_counter()
        done = on_head() if on_head else None
        self.ref_logp, nll = [], 0.0
        for i, b in enumerate(self.batches):
            targets = self.targets[b].reshape(-1)
            parts = []
            for rows, logp in self._head_chunks(self.hidden[L][i]):
                parts.append(logp)
                nll += -logp.gather(-1, targets[rows].unsqueeze(-1)).sum().item()
            self.ref_logp.append(torch.cat(parts))
        if done:
            done()
        self.head_seconds = time.perf_counter() - t_head
        self.ref_nll = nll / self.tokens

    def _head_chunks(self, hidden: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor]]:
        """Log-probabilities of a batch's tokens (flattened), ``head_chunk_bytes`` of logits at a time.

        The head's temporaries (logits, log-softmax, the KL terms) scale with tokens x vocabulary: a batch of
        2,048 tokens over DeepSeek-V3's 129,280-token vocabulary is 1 GiB per float32 copy, more than the
        streamed mode's single decoder layer, so they are computed a few hundred tokens at a time."""
        flat = hidden.reshape(-1, hidden.shape[-1])
        vocab = self.runner.model.config.get_text_config().vocab_size
        step = max(1, self.head_chunk_bytes // (4 * vocab))
        for start in range(0, flat.shape[0], step):
            rows = slice(start, start + step)
            yield rows, F.log_softmax(self.runner.head(flat[rows]), dim=-1)

    # ---------------------------------------------------------------------------------- perturbations
    def _effects(self, states: list[torch.Tensor]) -> Effect:
        nll, kl = 0.0, 0.0
        for i, b in enumerate(self.batches):
            targets = self.targets[b].reshape(-1)
            for rows, logp in self._head_chunks(states[i]):
                nll += -logp.gather(-1, targets[rows].unsqueeze(-1)).sum().item()
                kl += F.kl_div(logp, self.ref_logp[i][rows], reduction="sum", log_target=True).item()
        return Effect(nll / self.tokens - self.ref_nll, max(0.0, kl / self.tokens))

    def _chunk_size(self) -> int:
        per = sum(h.numel() * h.element_size() for h in self.hidden[0])
        return max(1, int(self.state_budget_bytes // max(per, 1)))

    @torch.no_grad()
    def evaluate(self, perturbations: Sequence[Perturbation], desc: str = "measuring") -> dict[Hashable, Effect]:
        """Effect of each perturbation applied alone (see the module docstring)."""
        L = self.runner.num_layers
        by_step: dict[int, list[Perturbation]] = {}
        out: dict[Hashable, Effect] = {}
        for p in perturbations:
            known = self.journal.get(desc, p.key) if self.journal is not None else None
            if known is not None:  # measured before an interruption (--resume)
                out[p.key] = Effect(*known)
            else:
                by_step.setdefault(p.step, []).append(p)
        bar = self._bar(len(perturbations), desc)
        bar.update(len(out))
        size = self._chunk_size()
        for step in sorted(by_step):
            group = by_step[step]
            for c in range(0, len(group), size):
                chunk = group[c:c + size]
                states: list[list[torch.Tensor]] = []
                if step == EMBED_STEP:
                    for p in chunk:
                        with p.apply():
                            states.append([self.runner.embed(self.inputs[b])[0] for b in self.batches])
                    first = 0
                elif step >= L:
                    for p in chunk:
                        with p.apply():
                            self._store(out, desc, p.key, self._effects(self.hidden[L]))
                        bar.update()
                    continue
                else:
                    with self.runner.layer(step) as mod:
                        for p in chunk:
                            with p.apply():
                                states.append([run_layer(mod, h, self.kwargs[i][step])
                                               for i, h in enumerate(self.hidden[step])])
                    first = step + 1
                for layer in range(first, L):
                    with self.runner.layer(layer) as mod:
                        for s in states:
                            for i in range(len(s)):
                                s[i] = run_layer(mod, s[i], self.kwargs[i][layer])
                for p, s in zip(chunk, states):
                    self._store(out, desc, p.key, self._effects(s))
                    bar.update()
        bar.close()
        return out

    def _store(self, out: dict[Hashable, Effect], section: str, key: Hashable, effect: Effect) -> None:
        out[key] = effect
        if self.journal is not None:
            self.journal.record(section, key, effect.dnll, effect.kl)

    @torch.no_grad()
    def evaluate_full(self, apply: Callable[[], AbstractContextManager] = nullcontext) -> Effect:
        """Effect of a change anywhere in the model (a whole plan): a full pass, embeddings included."""
        L = self.runner.num_layers
        with apply():
            states = [self.runner.embed(self.inputs[b])[0] for b in self.batches]
            for layer in range(L):
                with self.runner.layer(layer) as mod:
                    states = [run_layer(mod, h, self.kwargs[i][layer]) for i, h in enumerate(states)]
            return self._effects(states)
