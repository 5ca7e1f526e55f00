"""Owned hooks: capture what each decoder block is called with, and its Linears' input statistics."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .stats import STATISTICS


@dataclass
class BlockCall:
    """Everything a block was called with, minus the hidden states."""

    args: tuple
    kwargs: dict


def _split_hidden(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    if args:
        return args[0], args[1:], kwargs
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


@contextlib.contextmanager
def record_block_calls(blocks: nn.ModuleList) -> Iterator[list]:
    """While active, every block is an identity that records its call.

    Yields a list that, after one decoder forward, holds ``(block-0 hidden input,
    [BlockCall for each block])``. The decoder computes masks and rotary embeddings for
    every block as it would for real, so whatever a block's signature is in this
    transformers version (per-layer masks, sliding windows) is captured, not rebuilt.
    """
    record: list = []
    calls: list[BlockCall | None] = [None] * len(blocks)

    def recorder(index: int):
        def forward(*args, **kwargs):
            hidden, rest, kw = _split_hidden(args, kwargs)
            calls[index] = BlockCall(rest, kw)
            if index == 0:
                record.append(hidden)
            if index == len(blocks) - 1:
                record.append(list(calls))
            return hidden

        return forward

    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        yield record
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward


class StopForward(Exception):
    """Raised once every prunable layer of a block has seen its input: the rest is not needed."""


@dataclass
class StatisticsCollector:
    """Per-layer statistics; layers fed the same tensor (q/k/v, gate/up) share one accumulator."""

    layers: dict[str, nn.Module]
    needs: tuple[str, ...]
    stop_early: bool = True
    stats: dict[str, dict[str, Any]] = field(default_factory=dict)
    _shared_with: dict[str, str] = field(default_factory=dict)
    _seen: dict[int, tuple[torch.Tensor, int, str]] = field(default_factory=dict)
    _called: set = field(default_factory=set)

    def hook(self, name: str):
        def pre_hook(module, args):
            x = args[0]
            self._called.add(name)
            owner = self._owner(name, x)
            if owner == name:
                if name not in self.stats:
                    self.stats[name] = {k: STATISTICS[k](x.shape[-1], x.device) for k in self.needs}
                for acc in self.stats[name].values():
                    acc.add(x)
            if self.stop_early and len(self._called) == len(self.layers):
                raise StopForward

        return pre_hook

    def _owner(self, name: str, x: torch.Tensor) -> str:
        if name in self._shared_with:
            return self._shared_with[name]
        key = x.data_ptr()
        seen = self._seen.get(key)
        # the same live tensor (we hold a reference, so its memory cannot be reused meanwhile)
        if seen is not None and seen[0].shape == x.shape and seen[0].stride() == x.stride() and seen[1] == x._version:
            self._shared_with[name] = seen[2]
        else:
            self._seen[key] = (x, x._version, name)
            self._shared_with[name] = name
        return self._shared_with[name]

    def end_call(self) -> None:
        self._seen.clear()
        self._called.clear()

    def for_layer(self, name: str) -> dict[str, Any]:
        owner = self._shared_with.get(name)
        if owner is None or owner not in self.stats:
            raise RuntimeError(f"layer {name} received no calibration input; it cannot be pruned with statistics")
        return self.stats[owner]

    def input_of(self, name: str) -> str:
        """The Linear whose input statistics ``name`` reads (itself unless it shares another's input)."""
        return self._shared_with.get(name, name)

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, owner in self._shared_with.items():
            out.setdefault(owner, []).append(name)
        return out


@contextlib.contextmanager
def collect_statistics(layers: dict[str, nn.Module], needs: tuple[str, ...], stop_early: bool = True):
    collector = StatisticsCollector(layers, needs, stop_early)
    handles = [m.register_forward_pre_hook(collector.hook(n)) for n, m in layers.items()]
    try:
        yield collector
    finally:
        for h in handles:
            h.remove()
