"""Layer by layer: capture block inputs -> statistics -> prune -> re-run the pruned block -> next.

The runner knows blocks, devices and propagation; it knows nothing about scores.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import BlockCall, StopForward, collect_statistics, record_block_calls
from .errors import UsageError
from .models import find_decoder, prunable_layers, set_weight_matrix, weight_matrix
from .patterns import Pattern, check_fits


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    zeros: int

    @property
    def sparsity(self) -> float:
        return self.zeros / (self.shape[0] * self.shape[1])


@contextlib.contextmanager
def _decoder_stem_on(decoder: nn.Module, blocks: nn.ModuleList, device: torch.device):
    """Move everything of the decoder except its blocks (embeddings, rotary, norms) to ``device``."""
    moved = []
    for child in decoder.children():
        if child is blocks:
            continue
        params = list(child.parameters()) + list(child.buffers())
        if params and params[0].device != device:
            moved.append((child, params[0].device))
            child.to(device)
    try:
        yield
    finally:
        for child, where in moved:
            child.to(where)


def capture_block_inputs(model, tokens: torch.Tensor, batch_size: int, device: torch.device):
    """Block-0 inputs per calibration batch, and each block's call arguments per batch size."""
    decoder, blocks = find_decoder(model)
    hidden: list[torch.Tensor] = []
    calls: dict[int, list[BlockCall]] = {}
    with _decoder_stem_on(decoder, blocks, device), record_block_calls(blocks) as record:
        for start in range(0, tokens.shape[0], batch_size):
            chunk = tokens[start : start + batch_size].to(device)
            decoder(input_ids=chunk, use_cache=False)
            h, per_block = record[-2], record[-1]
            record.clear()
            hidden.append(h)
            calls.setdefault(chunk.shape[0], per_block)
    return hidden, calls


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _run_block(block, hidden, calls, *, collector=None):
    for i, h in enumerate(hidden):
        call = calls[h.shape[0]]
        try:
            out = block(h, *call.args, **call.kwargs)
        except StopForward:
            continue
        finally:
            if collector is not None:
                collector.end_call()
        if collector is None:
            hidden[i] = _block_output(out)


def prune_blocks(
    model: nn.Module,
    method,
    pattern: Pattern,
    tokens: torch.Tensor | None,
    device: torch.device,
    batch_size: int = 8,
    progress: bool = True,
    block_patterns: Sequence[Pattern] | None = None,
) -> list[LayerResult]:
    """Prune every decoder block's Linear layers in place; embeddings and lm_head are untouched.

    ``block_patterns`` (one per block) replaces ``pattern`` block by block (per-block sparsity).
    """
    decoder, blocks = find_decoder(model)
    if block_patterns is not None and len(block_patterns) != len(blocks):
        raise UsageError(f"--layerwise gives {len(block_patterns)} sparsities but the model has {len(blocks)} blocks")
    names = {id(m): n for n, m in model.named_modules()}
    for block in blocks:
        for name, layer in prunable_layers(block).items():
            check_fits(pattern, weight_matrix(layer).shape[1], f"{names[id(block)]}.{name}")

    hidden, calls = [], {}
    if method.needs:
        if tokens is None:
            raise ValueError(f"method {method.name} needs calibration tokens")
        hidden, calls = capture_block_inputs(model, tokens, batch_size, device)

    results: list[LayerResult] = []
    last = len(blocks) - 1
    for index, block in enumerate(tqdm(blocks, desc=f"{method.name} {pattern}", unit="block", disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        layers = prunable_layers(block)
        block_calls = {size: per_block[index] for size, per_block in calls.items()}
        collector = None
        if method.needs:
            with collect_statistics(layers, method.needs) as collector:
                _run_block(block, hidden, block_calls, collector=collector)
        for name, layer in layers.items():
            w = weight_matrix(layer)
            stats = collector.for_layer(name) if collector else {}
            new_w, _keep = method.prune(w, stats, pattern if block_patterns is None else block_patterns[index])
            set_weight_matrix(layer, new_w)
            results.append(LayerResult(f"{names[id(block)]}.{name}", tuple(w.shape), int((w == 0).sum())))
        del collector
        if method.needs and index < last:  # the last block's outputs feed nothing we prune
            _run_block(block, hidden, block_calls)
        block.to(home)
    return results
