"""Greedy decoding over a static KV cache, each decode step one CUDA-graph replay."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .. import devices
from ..errors import UsageError
from .kernel import Plan


def cache_kwarg(model: nn.Module) -> str:
    """The name a transformers model takes its KV cache under: ``cache`` (>= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class StaticDecoder:
    """Greedy decoding over a transformers ``StaticCache``; on CUDA one decode step is a captured CUDA graph.

    The prompt fills the cache eagerly. A step is: forward of the last token, argmax written into a fixed
    token buffer. transformers' static cache keeps its fill level as a GPU tensor that the step itself
    advances, so one replay is one whole decode step with no Python in between. With a sparse ``plan``
    each Linear's dense/sparse choice is made during capture (``Plan.capturing``: GPU-time choices) and
    costs nothing at replay. ``graph=False`` runs the same step eagerly (CPU, or a reference on CUDA).
    """

    def __init__(self, model: nn.Module, prompt_ids: torch.Tensor, max_len: int, plan: Plan | None = None,
                 graph: bool | None = None, warmup: int = 2):
        from transformers import StaticCache

        graph = prompt_ids.is_cuda if graph is None else graph
        if prompt_ids.shape[1] + (warmup if graph else 0) >= max_len:
            raise UsageError(f"a static cache of {max_len} positions cannot hold a {prompt_ids.shape[1]}-token "
                             f"prompt, {warmup if graph else 0} warm-up steps and one more; give a larger max_len")
        self.model, self.kw, self.max_len, self.plan = model, cache_kwarg(model), max_len, plan
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        with torch.no_grad():
            out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1, **{self.kw: self.cache})
        self.tok = out.logits[:, -1:].argmax(-1)
        self.logits = out.logits[:, -1]
        self.pos = prompt_ids.shape[1]
        self.history = [self.tok.clone()]
        self.graph = None
        if graph:
            self._capture(warmup)

    @torch.no_grad()
    def _step(self) -> None:
        out = self.model(input_ids=self.tok, use_cache=True, logits_to_keep=1, **{self.kw: self.cache})
        self.logits = out.logits[:, -1]
        self.tok.copy_(self.logits.argmax(-1, keepdim=True))

    def _capture(self, warmup: int) -> None:
        plan = self.plan or Plan()
        with plan.capturing():
            with devices.side_stream():
                for _ in range(warmup):  # real decode steps: they fill the cache too
                    self._step()
                    self.history.append(self.tok.clone())
            self.pos += warmup
            graph = devices.capture_graph(self._step)
        self.graph = graph

    def step(self) -> torch.Tensor:
        """One decode step; returns the live token buffer [batch, 1] (overwritten by the next step)."""
        if self.pos >= self.max_len:
            raise UsageError(f"the static cache is full ({self.max_len} positions); build the decoder with a larger max_len")
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.pos += 1
        return self.tok

    def generate(self, steps: int) -> torch.Tensor:
        """``steps`` more tokens; returns every token produced so far (prompt's next token first) [batch, n]."""
        for _ in range(steps):
            self.history.append(self.step().clone())
        return torch.cat(self.history, dim=1)

    def close(self) -> None:
        self.graph = self.cache = self.tok = self.logits = None
