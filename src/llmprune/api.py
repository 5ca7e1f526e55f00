"""The Python API: prune an already loaded model, evaluate perplexity. The CLI calls these."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import data as data_mod
from ._version import __version__
from .checkpoint import Checkpoint, model_fingerprint, tokens_sha256
from .config import Calibration, DSnoT, EvalSettings
from . import distributed, memory
from .devices import cpu_free_bytes, deterministic, free_bytes, resolve_device, synchronize
from .errors import UsageError
from .evaluate import Perplexity, perplexity, windows_of
from .guards import NumericalError
from .layerwise import OWL, block_outlier_ratios, block_sizes, owl_sparsities, parse_layerwise
from .methods import get_method, wrapped
from .models import context_length, find_decoder, needs_bos
from .patterns import Pattern, Unstructured, parse_pattern
from .runner import LayerResult, prune_blocks


TARGET_TOLERANCE = 1e-4
"""A reached overall sparsity further than this from the target is reported as a warning."""


@dataclass
class PruneResult:
    method: str
    pattern: Pattern
    layers: list[LayerResult]
    prune_s: float
    calibration: dict | None
    method_settings: dict = field(default_factory=dict)
    resumed_from_block: int = 0
    """Blocks restored from the checkpoint folder instead of computed (0: a fresh run)."""
    determinism: dict = field(default_factory=dict)
    """Whether the run was deterministic on its device, and why not where it was not."""
    memory_estimate: dict | None = None
    save_s: float = 0.0
    """Seconds spent waiting for the checkpoint's writer (not part of ``prune_s``)."""
    bytes_written: int = 0
    """Bytes the checkpoint wrote (block shards and state)."""
    tensor_sha256: dict = field(default_factory=dict)
    """State-dict name -> sha256 of the bytes, for the tensors the checkpoint wrote (``integrity.state_sha256``)."""

    @property
    def warnings(self) -> list[str]:
        """Each layer's numerical fix-ups, then a note if the whole model missed its target sparsity."""
        return [w for r in self.layers for w in r.warnings] + self._target_warning()

    def _target_warning(self) -> list[str]:
        target, reached = self.pattern.target, self.sparsity_overall
        if not self.layers or abs(reached - target) <= TARGET_TOLERANCE:
            return []
        why = ("each comparison group (a row, a matrix or an N:M group) prunes a whole number of weights, and "
               "weights that were zero before count as pruned")
        return [f"sparsity reached {reached:.4f}, not the target {target:.4f}: {why}"]

    @property
    def sparsity_overall(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.zeros for r in self.layers) / total if total else 0.0


def check_seqlen(model, seqlen: int, flag: str) -> None:
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        raise UsageError(f"{flag} {seqlen} is longer than the model's context of {limit} tokens; use {flag} {limit} or less")


def as_pattern(pattern: Pattern | str, sparsity: float | None) -> Pattern:
    if isinstance(pattern, str):
        return parse_pattern(pattern, sparsity)
    return pattern


def calibration_tokens(model, tokenizer, calibration: Calibration, data_dir=None) -> torch.Tensor:
    check_seqlen(model, calibration.seqlen, "--seqlen")
    if tokenizer is None:
        raise UsageError("calibration from text needs a tokenizer; pass one, or pass calib_tokens")
    tokens = data_mod.calibration_tokens(
        tokenizer, calibration.source, calibration.nsamples, calibration.seqlen, calibration.seed,
        data_mod.data_dir(data_dir),
    )
    if needs_bos(model):  # as in evaluation: every window starts with BOS, then seqlen-1 text tokens
        tokens = torch.cat([torch.full((tokens.shape[0], 1), tokenizer.bos_token_id), tokens[:, :-1]], dim=1)
    return tokens


@torch.no_grad()
def prune(
    model,
    tokenizer=None,
    *,
    method="wanda",
    pattern: Pattern | str = "unstructured",
    sparsity: float | None = 0.5,
    calibration: Calibration | None = None,
    calib_tokens: torch.Tensor | None = None,
    device: str | torch.device = "auto",
    batch_size: int = 8,
    data_dir: str | Path | None = None,
    progress: bool = True,
    layerwise: OWL | str | list[float] | None = None,
    permute: bool = False,
    update: str | None = None,
    refine: DSnoT | str | None = None,
    checkpoint_dir: str | Path | None = None,
    overwrite: bool = False,
    activations: str = "auto",
    world: distributed.World | None = None,
    placement=None,
) -> PruneResult:
    """Prune ``model`` in place, block by block; returns what was done.

    ``pattern`` is an ``Unstructured``/``NM`` object or a string ("unstructured", "2:4");
    ``calib_tokens`` ([nsamples, seqlen] ids) replaces sampling from ``calibration``; pass both when
    the tokens were drawn from that calibration setting, so that the result records it.
    ``layerwise``: None/"uniform", "owl" or ``OWL(m, lam)``, or one sparsity per block (unstructured
    only). ``permute``: choose N:M masks on permuted input channels (score methods). ``update="lsq"``:
    re-fit the kept weights by least squares on the calibration inputs after the mask. ``refine="dsnot"``
    (or ``DSnoT(cycles, threshold)``): refine a score method's mask by DSnoT's pruning-and-growing before
    any update.
    ``checkpoint_dir``: save progress there after every block and resume from it (same settings:
    bit-identical to an uninterrupted run; other settings: refused unless ``overwrite``). The folder
    then holds one safetensors shard per block and ``state.json``; it is not a model folder: save the
    model yourself afterwards (e.g. ``export.save_pruned``) and delete the folder. Under torchrun
    (``world``), rank 0 writes it and every rank reads it back on resume (one host).
    ``activations``: where calibration hidden states live between blocks on a GPU: ``auto`` (on the
    GPU when the memory estimate fits, else pinned CPU memory), ``gpu`` or ``cpu``. A run that cannot
    fit is refused before any work. ``world`` (from ``distributed.init``): this process's share of
    the calibration batches; statistics are summed over all processes. ``placement``: how blocks
    reach the device (``streaming.DiskBlocks`` for a model read from disk block by block).
    """
    method = get_method(method, permute=permute, update=update, refine=refine)
    pattern = as_pattern(pattern, sparsity)
    if isinstance(layerwise, str):
        layerwise = parse_layerwise(layerwise)
    if layerwise is not None and not isinstance(pattern, Unstructured):
        raise UsageError(f"--layerwise works with unstructured sparsity only, not --pattern {pattern}")
    if any(getattr(m, "permute", False) for m in wrapped(method)):
        if isinstance(pattern, Unstructured):
            raise UsageError("--permute only changes N:M masks; use it with --pattern N:M")
    if isinstance(layerwise, OWL) and not 0 <= pattern.sparsity - layerwise.lam <= pattern.sparsity + layerwise.lam < 1:
        raise UsageError(f"--layerwise owl: --sparsity {pattern.sparsity} +- --owl-lambda {layerwise.lam} leaves [0, 1); "
                         "use a smaller --owl-lambda")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    tokens, calib_info = None, None
    if method.needs or isinstance(layerwise, OWL):
        if calib_tokens is None:
            calibration = calibration or Calibration()
            tokens = calibration_tokens(model, tokenizer, calibration, data_dir)
        else:
            tokens = calib_tokens.long()
            check_seqlen(model, tokens.shape[1], "--calib-tokens seqlen")
        calib_info = calibration.to_dict() if calibration is not None else {
            "source": "tokens", "nsamples": tokens.shape[0], "seqlen": tokens.shape[1], "seed": None}
    settings = method.settings()
    block_patterns = None
    if layerwise is not None:
        if isinstance(layerwise, OWL):
            t0 = time.perf_counter()
            ratios = block_outlier_ratios(model, tokens, device, batch_size, layerwise.m, progress)
            per_block = owl_sparsities(ratios, pattern.sparsity, layerwise.lam, block_sizes(model))
            settings.update(layerwise="owl", owl_m=layerwise.m, owl_lambda=layerwise.lam, outlier_ratios=ratios,
                            owl_pass_s=time.perf_counter() - t0)
        else:
            per_block = [float(v) for v in layerwise]
            n_blocks = len(find_decoder(model)[1])
            if len(per_block) != n_blocks:
                raise UsageError(f"--layerwise gives {len(per_block)} sparsities but the model has {n_blocks} blocks")
            settings.update(layerwise="list")
        settings["block_sparsity"] = per_block
        block_patterns = [Unstructured(s, pattern.scope) for s in per_block]
    world = world or distributed.World()
    checkpoint = None
    if checkpoint_dir is not None:  # settings from all the calibration tokens, not this process's share
        checkpoint = Checkpoint(checkpoint_dir, run_settings(model, method, pattern, tokens, device, batch_size, settings),
                                overwrite, writer=world.is_main, barrier=lambda: distributed.barrier(world))
    if tokens is not None:
        tokens = distributed.shard(tokens, batch_size, world)
    estimate = memory.plan(memory.ModelSizes.of(model, device), tokens.shape[0] if tokens is not None else 0,
                           tokens.shape[1] if tokens is not None else 0, batch_size, method.needs, device,
                           activations, free_bytes(device), cpu_free_bytes())
    if progress:
        print(estimate.describe(device), file=sys.stderr, flush=True)
    with deterministic(device) as determinism, (checkpoint.stop_between_blocks() if checkpoint else nullcontext()):
        try:
            layers = prune_blocks(model, method, pattern, tokens, device, batch_size, progress and world.is_main,
                                  block_patterns, checkpoint=checkpoint, offload_activations=estimate.offload,
                                  reduce_statistics=distributed.reducer(world), placement=placement)
        except BaseException as exc:
            if checkpoint is not None:
                checkpoint.close(quiet=True)  # what was queued is written: a re-run resumes after it
                if isinstance(exc, NumericalError):
                    checkpoint.discard()  # its blocks came from numbers that cannot be trusted
            raise
        if checkpoint is not None:
            checkpoint.close()
    synchronize(device)
    model.train(was_training)
    resumed, save_s, written = (checkpoint.resumed_from, checkpoint.wait_s, checkpoint.bytes_written) if checkpoint \
        else (0, 0.0, 0)
    return PruneResult(method.name, pattern, layers, time.perf_counter() - start - save_s, calib_info, settings,
                       resumed, determinism,
                       {"device_bytes": estimate.device_bytes, "cpu_bytes": estimate.cpu_bytes,
                        "activations": "cpu" if estimate.offload else str(device), "processes": world.size},
                       save_s, written, checkpoint.tensor_sha256() if checkpoint else {})


def run_settings(model, method, pattern: Pattern, tokens, device: torch.device, batch_size: int,
                 method_settings: dict | None = None) -> dict:
    """Everything that decides the pruned weights: a checkpoint resumes only a run with these same values."""
    return {
        "model": model_fingerprint(model),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "method": method.name,
        "method_settings": {k: v for k, v in (method_settings or method.settings()).items()
                            if not k.endswith("_s")},  # timings differ from run to run
        "pattern": str(pattern),
        "sparsity_target": pattern.target,
        "scope": getattr(pattern, "scope", None),
        "calibration_tokens_sha256": tokens_sha256(tokens),
        "batch_size": batch_size,
        "device": device.type,
        "versions": {"llmprune": __version__, "torch": torch.__version__},
    }


def eval_windows(model, tokenizer, settings: EvalSettings, data_dir=None) -> dict[str, torch.Tensor]:
    """The evaluation windows of each set (tokenized once; reuse them for dense and pruned)."""
    check_seqlen(model, settings.seqlen, "--eval-seqlen")
    ddir = data_mod.data_dir(data_dir)
    bos = None
    if needs_bos(model):
        bos = tokenizer.bos_token_id
        if bos is None:
            raise UsageError("this model needs a BOS token in evaluation but its tokenizer defines none")
    return {name: windows_of(data_mod.eval_tokens(tokenizer, name, settings.seqlen, ddir), settings.seqlen,
                             settings.max_windows, bos)
            for name in settings.sets}


@torch.no_grad()
def perplexities(model, windows: dict[str, torch.Tensor], settings: EvalSettings, device: str | torch.device = "auto",
                 progress: bool = True, label: str = "") -> dict[str, Perplexity]:
    """Perplexity of ``model`` on prepared windows; the model is moved to ``device``."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    batch = settings.batch_size or max(1, 4096 // settings.seqlen)
    model.to(device)
    model.eval()
    return {name: perplexity(model, wins, device, batch, progress, desc=f"{label} {name}".strip())
            for name, wins in windows.items()}


def evaluate_perplexity(
    model, tokenizer, settings: EvalSettings, device: str | torch.device = "auto", data_dir=None, progress: bool = True,
    label: str = "",
) -> dict[str, Perplexity]:
    """Perplexity of ``model`` on each set of ``settings``; the model is moved to ``device``."""
    return perplexities(model, eval_windows(model, tokenizer, settings, data_dir), settings, device, progress, label)
