"""Layer by layer: capture block inputs -> statistics -> prune -> re-run the pruned block -> next.

The runner knows blocks, devices and propagation; it knows nothing about scores.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import ActivationStore
from .capture import BlockCall, StopForward, collect_statistics, record_block_calls
from .errors import UsageError
from .guards import NumericalError, check_finite, record_numerical_warnings, statistic_tensors
from .layout import local_state
from .methods.base import prune_layer
from .models import find_decoder, prunable_layers, set_weight_matrix, weight_matrix
from .patterns import Pattern, check_fits
from .permute import order_from_text, order_to_text, stored_order


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, int]
    zeros: int
    warnings: list[str] = field(default_factory=list)
    """Numerical fix-ups made for this layer (e.g. more dampening); empty when none."""
    perm: torch.Tensor | None = None
    """``--permute``: the input-column order the mask is N:M in (position p holds column ``perm[p]``, CPU int64);
    None when the mask is N:M as stored."""

    @property
    def sparsity(self) -> float:
        return self.zeros / (self.shape[0] * self.shape[1])

    def to_record(self) -> dict:
        """As JSON (the checkpoint's state): the order as base64 text (``permute.order_to_text``)."""
        return {"name": self.name, "shape": list(self.shape), "zeros": self.zeros, "warnings": list(self.warnings),
                "perm": None if self.perm is None else order_to_text(self.perm)}

    @classmethod
    def from_record(cls, record: dict) -> LayerResult:
        shape = tuple(record["shape"])
        perm = record.get("perm")
        return cls(record["name"], shape, record["zeros"], list(record.get("warnings", [])),
                   None if perm is None else order_from_text(perm, shape[1]))


class Placement(Protocol):
    """How blocks reach the compute device and leave it (``InMemory``; ``streaming.DiskBlocks``)."""

    keeps_weights: bool
    """True when a finished block keeps its weights in memory (a resume must put the saved ones back)."""

    def load(self, index: int, block: nn.Module, device: torch.device, saved: dict | None = None) -> None: ...

    def release(self, index: int, block: nn.Module) -> None: ...


class InMemory:
    """Blocks live in memory (CPU or device); each visits the compute device while it is pruned."""

    keeps_weights = True  # a resumed run must put the saved weights of every finished block back

    def __init__(self) -> None:
        self._home: dict[int, torch.device] = {}

    def load(self, index: int, block: nn.Module, device: torch.device, saved: dict | None = None) -> None:
        """Bring block ``index`` to ``device``; ``saved`` (its state from a checkpoint) replaces its tensors."""
        self._home[index] = next(block.parameters()).device
        block.to(device)
        if saved is not None:
            block.load_state_dict(saved, strict=True)

    def release(self, index: int, block: nn.Module) -> None:
        block.to(self._home.pop(index))


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


def capture_block_inputs(model, tokens: torch.Tensor, batch_size: int, device: torch.device, hidden=None):
    """Block-0 inputs per calibration batch (appended to ``hidden``: a list, or an ``ActivationStore``),
    and each block's call arguments per batch size."""
    decoder, blocks = find_decoder(model)
    hidden = [] if hidden is None else hidden
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
    checkpoint=None,
    offload_activations: bool = False,
    reduce_statistics=None,
    placement: Placement | None = None,
    share_layers=None,
) -> list[LayerResult]:
    """Prune every decoder block's Linear layers in place; embeddings and lm_head are untouched.

    ``block_patterns`` (one per block) replaces ``pattern`` block by block (per-block sparsity).
    ``checkpoint`` (a ``checkpoint.Checkpoint``) says how many blocks a previous run finished; their
    saved weights are put back and only their propagation forward is re-run; each new block is
    saved when it is done. NaN/Inf in a block's inputs, statistics or outputs raises
    ``NumericalError`` naming the block and layer.
    ``offload_activations`` keeps the calibration hidden states in pinned CPU memory between blocks.
    ``reduce_statistics(collector)``, if given, combines each block's statistics with other
    processes' (see ``distributed``) before any Linear is pruned. ``placement`` brings each block to
    the device and takes it back (default ``InMemory``; ``streaming.DiskBlocks`` reads them from files).
    ``share_layers`` (``distributed.LayerShare``), if given, prunes each Linear on one process and shares it.
    """
    placement = placement or InMemory()
    blocks = find_decoder(model)[1]
    if block_patterns is not None and len(block_patterns) != len(blocks):
        raise UsageError(f"--layerwise gives {len(block_patterns)} sparsities but the model has {len(blocks)} blocks")
    names = {id(m): n for n, m in model.named_modules()}
    for block in blocks:
        for name, layer in prunable_layers(block).items():
            check_fits(pattern, weight_matrix(layer).shape[1], f"{names[id(block)]}.{name}")
    first, results, hidden, calls = _start(model, blocks, names, method, tokens, device, batch_size, checkpoint,
                                           offload_activations, placement)
    bar = tqdm(total=len(blocks), initial=first, desc=f"{method.name} {pattern}", unit="block", disable=not progress)
    for index in range(first, len(blocks)):
        block = blocks[index]
        placement.load(index, block, device)
        block_pattern = pattern if block_patterns is None else block_patterns[index]
        results += _prune_block(block, index, names[id(block)], method, block_pattern, hidden, _calls_of(calls, index),
                                (reduce_statistics, share_layers), propagate=index < len(blocks) - 1)
        if checkpoint is not None:
            checkpoint.save(index, block, names[id(block)], [r.to_record() for r in results], len(blocks))
        placement.release(index, block)
        bar.update()
    bar.close()
    return results


def _start(model, blocks, names, method, tokens, device, batch_size, checkpoint, offload_activations, placement):
    """(first block to prune, the finished blocks' results, block 0's inputs, the blocks' call arguments): what a
    previous run finished is put back and its propagation replayed."""
    restored = checkpoint.restore(len(blocks)) if checkpoint is not None else None
    first = restored.done if restored else 0
    results = _restored_results(restored.layers, checkpoint) if restored else []
    hidden, calls = [], {}
    propagate = method.needs and first < len(blocks)
    if propagate:
        if tokens is None:
            raise ValueError(f"method {method.name} needs calibration tokens")
        store = ActivationStore(device, offload_activations)
        hidden, calls = capture_block_inputs(model, tokens, batch_size, device, store)
        check_finite(hidden, "the inputs of block 0", hidden[0].dtype)
    if first:
        _replay(blocks, names, first, placement, checkpoint, device, hidden if propagate else None, calls)
    if checkpoint is not None:
        checkpoint.begin()
    return first, results, hidden, calls


def _restored_results(records: list[dict], checkpoint) -> list[LayerResult]:
    try:
        return [LayerResult.from_record(r) for r in records]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"the saved progress in {checkpoint.folder} is damaged (a layer's record: {exc}); delete that "
                         "folder to start again") from None


def _prune_block(block, index: int, prefix: str, method, pattern, hidden, block_calls, processes,
                 propagate: bool) -> list[LayerResult]:
    """Statistics of one block's Linears over its inputs, each Linear pruned, then (``propagate``) the pruned
    block's outputs in place of ``hidden``: the next block's inputs. ``processes``: (``reduce_statistics``,
    ``share_layers``) of ``prune_blocks``."""
    reduce_statistics, share_layers = processes
    dtype = next(block.parameters()).dtype
    layers = prunable_layers(block)
    collector = None
    if method.needs:
        with collect_statistics(layers, method.needs) as collector:
            _run_block(block, hidden, block_calls, collector=collector)
        if reduce_statistics is not None:
            reduce_statistics(collector)
    def prune_one(name: str) -> LayerResult:
        return _prune_layer(method, pattern, layers[name], collector, name, f"{prefix}.{name}", index, dtype)

    if share_layers is None:
        results = [prune_one(name) for name in layers]
    else:
        results = share_layers(layers, prune_one, tuple(method.needs), lambda name: _input_key(collector, name))
    del collector
    if method.needs and propagate:  # the last block's outputs feed nothing we prune
        _run_block(block, hidden, block_calls)
        check_finite(hidden, f"the output of block {index} ({prefix})", dtype)
    return results


def _input_key(collector, name: str) -> str:
    """Which statistic a Linear reads: Linears fed by the same input share it (and its factorisation)."""
    return collector.input_of(name) if collector is not None else name


def _calls_of(calls: dict[int, list[BlockCall]], index: int) -> dict[int, BlockCall]:
    return {size: per_block[index] for size, per_block in calls.items()}


def _replay(blocks, names, first: int, placement, checkpoint, device, hidden, calls) -> None:
    """Put the saved weights of blocks ``0..first-1`` back and, when ``hidden`` is given, run only their
    propagation forward: the same operations as the uninterrupted run, so the same inputs of block ``first``."""
    for index in range(first):
        if hidden is None and not getattr(placement, "keeps_weights", True):
            continue  # a streamed block that nothing needs: it stays in its shard
        block, prefix = blocks[index], names[id(blocks[index])]
        placement.load(index, block, device, local_state(checkpoint.block_state(index), prefix))
        if hidden is not None:
            _run_block(block, hidden, _calls_of(calls, index))
            check_finite(hidden, f"the output of block {index} ({prefix}, restored)", next(block.parameters()).dtype)
        placement.release(index, block)


def _prune_layer(method, pattern, layer, collector, name: str, full_name: str, index: int, dtype) -> LayerResult:
    where = f"{full_name} (block {index})"
    stats = collector.for_layer(name) if collector else {}
    check_finite(statistic_tensors(stats), f"the input statistics of {where}", dtype)
    w = weight_matrix(layer)
    try:
        with record_numerical_warnings() as notes:
            pruned = prune_layer(method, w, stats, pattern)
    except NumericalError as exc:
        raise NumericalError(f"{where}: {exc}") from None
    check_finite([pruned.weight], f"the pruned weight of {where}", dtype)
    # a masked negative weight is -0.0 after w * mask; +0.0 everywhere (x + 0.0 changes nothing else), so the
    # saved zeros, the report's weights_sha256 and a compressed folder's reload agree bit for bit
    set_weight_matrix(layer, pruned.weight + 0.0)
    return LayerResult(full_name, tuple(w.shape), int((w == 0).sum()), [f"{full_name}: {n}" for n in notes],
                       stored_order(pruned.perm))
