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
from .config import Calibration, EvalSettings
from .methods.dsnot import DSnoT
from . import distributed, memory
from .devices import cpu_free_bytes, deterministic, free_bytes, resolve_device, synchronize
from .errors import UsageError
from .evaluate import Perplexity, perplexity, windows_of
from .guards import NumericalError
from .job import check_combination
from .layerwise import OWL, block_outlier_ratios, block_sizes, owl_sparsities, parse_layerwise
from .methods import get_method
from .models import context_length, needs_bos
from .patterns import Pattern, Unstructured, parse_pattern
from .runner import LayerResult, prune_blocks
from . import surgery
from .structured import Structured, StructuredResult


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

    def permutations(self) -> dict[str, torch.Tensor]:
        """Linear name -> the input-column order its N:M mask was chosen in (``--permute``; only the Linears whose
        order is not the stored one): what ``save_pruned(..., perms=...)`` and ``inference.sparsify`` take."""
        return {r.name: r.perm for r in self.layers if r.perm is not None}

    @property
    def sparsity_overall(self) -> float:
        total = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.zeros for r in self.layers) / total if total else 0.0


def check_seqlen(model, seqlen: int, flag: str) -> None:
    limit = context_length(model)
    if limit is not None and seqlen > limit:
        raise UsageError(f"{flag} {seqlen} is longer than the model's context of {limit} tokens; use {flag} {limit} or less")


def as_pattern(pattern: Pattern | str, sparsity: float | None, scope: str | None = None) -> Pattern:
    """A pattern object from "unstructured"/"N:M" (with ``sparsity`` and ``scope``) or as given; ``scope`` set on an
    ``Unstructured`` object replaces its own."""
    if isinstance(pattern, str):
        return parse_pattern(pattern, sparsity, scope)
    if scope is None:
        return pattern
    return parse_pattern("unstructured" if isinstance(pattern, Unstructured) else str(pattern),
                         getattr(pattern, "sparsity", None), scope)


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
    model, tokenizer=None, *, method="wanda", pattern: Pattern | str = "unstructured", sparsity: float | None = 0.5,
    calibration: Calibration | None = None, calib_tokens: torch.Tensor | None = None,
    device: str | torch.device = "auto", batch_size: int = 8, data_dir: str | Path | None = None,
    progress: bool = True, layerwise: OWL | str | list[float] | None = None, permute: bool = False,
    update: str | None = None, refine: DSnoT | str | None = None, checkpoint_dir: str | Path | None = None,
    overwrite: bool = False, activations: str = "auto", world: distributed.World | None = None, placement=None,
    scope: str | None = None,
) -> PruneResult:
    """Prune ``model`` in place, block by block; returns what was done.

    ``pattern``: ``Unstructured``/``NM`` or "unstructured"/"2:4"; ``scope`` (row | matrix, unstructured only)
    overrides the method's own comparison group (``Unstructured.scope``). ``calib_tokens`` ([nsamples, seqlen] ids)
    replace sampling from ``calibration`` (pass both to record where they came from). ``layerwise``: None,
    "owl", ``OWL(m, lam)`` or one sparsity per block. ``permute`` (N:M masks on permuted input channels),
    ``refine`` ("dsnot" or ``DSnoT(...)``) and ``update`` ("lsq") modify the method (``methods.get_method``).
    ``checkpoint_dir``: one safetensors shard per finished block and ``state.json``; the same call resumes
    from it bit-identically, other settings are refused unless ``overwrite``. It is not a model folder.
    ``activations``: where hidden states live between blocks on a GPU (auto | gpu | cpu); a run that cannot
    fit is refused before any work. ``world`` (``distributed.init``): this process's share of the
    calibration, statistics summed over processes. ``placement``: how blocks reach the device
    (``streaming.DiskBlocks`` reads them from disk).
    """
    method = get_method(method, permute=permute, update=update, refine=refine)
    pattern = as_pattern(pattern, sparsity, scope)
    layerwise = parse_layerwise(layerwise) if isinstance(layerwise, str) else layerwise
    check_combination(method, pattern, layerwise)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    tokens, calib_info = _calibration_of(model, tokenizer, method, layerwise, calibration, calib_tokens, data_dir)
    settings = method.settings()
    block_patterns = _block_patterns(model, pattern, layerwise, tokens, device, batch_size, progress, settings)
    world = world or distributed.World()
    checkpoint = None
    if checkpoint_dir is not None:  # settings from all the calibration tokens, not this process's share
        checkpoint = Checkpoint(checkpoint_dir, run_settings(model, method, pattern, tokens, device, batch_size, settings),
                                overwrite, writer=world.is_main, barrier=lambda: distributed.barrier(world))
    if tokens is not None:
        tokens = distributed.shard(tokens, batch_size, world)
    estimate = _memory_plan(model, method, tokens, device, batch_size, activations, progress)
    with deterministic(device) as determinism:
        layers = _run_blocks(model, method, pattern, tokens, device, batch_size, progress and world.is_main,
                             block_patterns, checkpoint, estimate.offload, world, placement)
    synchronize(device)
    model.train(was_training)
    return _result(method, pattern, layers, time.perf_counter() - start, calib_info, settings, determinism, estimate,
                   device, world, checkpoint)


@torch.no_grad()
def prune_structured(
    model, tokenizer=None, *, structure: Structured | str = "mlp,heads", remove: float | None = None,
    widths: dict | str | None = None, importance: str = "wanda-sp", restore: str = "none", width_multiple: int = 32,
    objective: str = "output", allocation: str = "uniform", calibration: Calibration | None = None, calib_tokens: torch.Tensor | None = None,
    device: str | torch.device = "auto", batch_size: int = 8, data_dir: str | Path | None = None,
    progress: bool = True,
) -> StructuredResult:
    """Shrink ``model`` in place into a smaller dense model of the same class, block by block.

    ``structure``: a ``Structured`` or a comma list of mlp, heads, blocks; ``remove``: the fraction of the
    decoder blocks' parameters to remove, or ``widths`` ({"intermediate_size": 1216, ...} or
    "intermediate_size=1216,...") instead. ``importance``: wanda-sp | flap | magnitude; ``restore``: none | lsq |
    bias; ``objective``: output | post-norm (what the importance and lsq measure); ``allocation``: uniform |
    adaptive (per-block MLP widths, FLAP's search; such a folder loads with ``llmprune.load``). Uniform widths are the same in every block, so ``model.save_pretrained`` gives a folder that plain
    ``from_pretrained`` loads. A separate call from ``prune``: the model changes shape instead of holding
    zeros, and none of ``prune``'s pattern options apply.
    """
    from .structured_runner import prune_structured_blocks

    opts = structure if isinstance(structure, Structured) else Structured.parse(
        structure, remove, widths, importance, restore, width_multiple, objective, allocation)
    device = device if isinstance(device, torch.device) else resolve_device(device)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    surgery.check_supported(model)
    was_training = model.training
    model.eval()
    tokens, info = None, None
    if opts.needs_calibration:
        tokens, info = _draw_calibration(model, tokenizer, calibration, calib_tokens, data_dir)
    with deterministic(device):
        result = prune_structured_blocks(model, tokens, opts, device, batch_size, progress)
    synchronize(device)
    model.train(was_training)
    result.calibration = info
    return result


def _result(method, pattern, layers, seconds: float, calib_info, settings, determinism, estimate, device, world,
            checkpoint) -> PruneResult:
    """The run's record; the time spent waiting for the checkpoint's writer is apart from ``prune_s``."""
    resumed, save_s, written = (checkpoint.resumed_from, checkpoint.wait_s, checkpoint.bytes_written) if checkpoint \
        else (0, 0.0, 0)
    return PruneResult(method.name, pattern, layers, seconds - save_s, calib_info, settings, resumed, determinism,
                       {"device_bytes": estimate.device_bytes, "cpu_bytes": estimate.cpu_bytes,
                        "activations": "cpu" if estimate.offload else str(device), "processes": world.size},
                       save_s, written, checkpoint.tensor_sha256() if checkpoint else {})


def work_bytes(method) -> tuple[int, int]:
    """The method's working memory per weight entry and per [cols, cols] entry (``memory.WORK_BYTES``)."""
    return getattr(method, "work_bytes", memory.WORK_BYTES)


def _memory_plan(model, method, tokens, device, batch_size: int, activations: str, progress: bool):
    """What the run will hold where (refused here when it cannot fit), printed when ``progress``."""
    n, length = (tokens.shape[0], tokens.shape[1]) if tokens is not None else (0, 0)
    estimate = memory.plan(memory.ModelSizes.of(model, device), n, length, batch_size, method.needs, device,
                           activations, free_bytes(device), cpu_free_bytes(), work_bytes(method))
    if progress:
        print(estimate.describe(device), file=sys.stderr, flush=True)
    return estimate


def _calibration_of(model, tokenizer, method, layerwise, calibration, calib_tokens, data_dir):
    """(calibration tokens or None when nothing needs them, what the report says of them)."""
    if not (method.needs or isinstance(layerwise, OWL)):
        return None, None
    return _draw_calibration(model, tokenizer, calibration, calib_tokens, data_dir)


def _draw_calibration(model, tokenizer, calibration, calib_tokens, data_dir):
    """(the calibration tokens: ``calib_tokens``, or drawn from ``calibration``; what the report says of them)."""
    if calib_tokens is None:
        calibration = calibration or Calibration()
        tokens = calibration_tokens(model, tokenizer, calibration, data_dir)
    else:
        tokens = calib_tokens.long()
        check_seqlen(model, tokens.shape[1], "--calib-tokens seqlen")
    info = calibration.to_dict() if calibration is not None else {
        "source": "tokens", "nsamples": tokens.shape[0], "seqlen": tokens.shape[1], "seed": None}
    return tokens, info


def _block_patterns(model, pattern, layerwise, tokens, device, batch_size: int, progress: bool, settings: dict):
    """One pattern per decoder block from the layer-wise sparsity (None: the same pattern everywhere); what was
    chosen goes into ``settings``."""
    if layerwise is None:
        return None
    if isinstance(layerwise, OWL):
        t0 = time.perf_counter()
        ratios = block_outlier_ratios(model, tokens, device, batch_size, layerwise.m, progress)
        per_block = owl_sparsities(ratios, pattern.sparsity, layerwise.lam, block_sizes(model), layerwise.variant)
        settings.update(layerwise="owl", owl_m=layerwise.m, owl_lambda=layerwise.lam, owl_variant=layerwise.variant,
                        outlier_ratios=ratios, owl_pass_s=time.perf_counter() - t0)
    else:
        per_block = [float(v) for v in layerwise]  # (their count is checked by runner.prune_blocks)
        settings.update(layerwise="list")
    settings["block_sparsity"] = per_block
    return [Unstructured(s, pattern.scope) for s in per_block]


def _run_blocks(model, method, pattern, tokens, device, batch_size, progress, block_patterns, checkpoint, offload,
                world, placement):
    """``runner.prune_blocks`` with the checkpoint closed however it ends (what was queued is written, so a
    re-run resumes after it; a numerical failure discards it)."""
    with checkpoint.stop_between_blocks() if checkpoint else nullcontext():
        try:
            layers = prune_blocks(model, method, pattern, tokens, device, batch_size, progress, block_patterns,
                                  checkpoint=checkpoint, offload_activations=offload,
                                  reduce_statistics=distributed.reducer(world), placement=placement,
                                  share_layers=distributed.layer_share(world))
        except BaseException as exc:
            if checkpoint is not None:
                checkpoint.close(quiet=True)
                if isinstance(exc, NumericalError):
                    checkpoint.discard()  # its blocks came from numbers that cannot be trusted
            raise
        if checkpoint is not None:
            checkpoint.close()
    return layers


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
