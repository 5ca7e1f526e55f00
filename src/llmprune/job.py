"""A whole run as one typed object: what to prune, how, what to evaluate, where to save.

``config`` holds the leaf options (calibration, evaluation, DSnoT), which the methods import; this
module composes them with the method, pattern and layer-wise choice, so it sits above ``methods``.
Strings are parsed once, in ``PruneJob.from_flags`` / ``EvalJob.from_flags``; every rule that ties
two fields together is checked once, on construction, before any model is loaded. Errors name the
command-line flag, the name a user of either the command or the library meets in the documentation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from . import devices, export, memory, zeroshot
from .config import Calibration, EvalSettings, parse_sets
from .errors import UsageError
from .layerwise import OWL, parse_layerwise
from .methods import DSnoT, as_refine, get_method, wrapped
from .patterns import Pattern, Unstructured, parse_pattern
from .structured import Structured

def check_combination(method, pattern: Pattern, layerwise) -> None:
    """The rules between a method, its pattern and a layer-wise sparsity (the job and ``api.prune`` both use it)."""
    if layerwise is not None and not isinstance(pattern, Unstructured):
        raise UsageError(f"--layerwise works with unstructured sparsity only, not --pattern {pattern}")
    if isinstance(pattern, Unstructured) and any(getattr(m, "permute", False) for m in wrapped(method)):
        raise UsageError("--permute only changes N:M masks; use it with --pattern N:M")
    if isinstance(layerwise, OWL) and not 0 <= pattern.sparsity - layerwise.lam <= pattern.sparsity + layerwise.lam < 1:
        raise UsageError(f"--layerwise owl: --sparsity {pattern.sparsity} +- --owl-lambda {layerwise.lam} leaves [0, 1); "
                         "use a smaller --owl-lambda")


@dataclass(frozen=True)
class RunSettings:
    """Where and how the pruning runs."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int = 8
    """Calibration windows per forward pass."""
    activations: str = "auto"
    """Where hidden states live between blocks on a GPU: auto | gpu | cpu."""
    weights: str = "auto"
    """Where the model's weights live while pruned on a GPU: auto | gpu | cpu."""
    stream_from_disk: bool = False
    """Read one block at a time from the model folder, write the output block by block."""
    progress: bool = True

    def __post_init__(self) -> None:
        memory.check_placement(self.activations, "--activations")
        memory.check_placement(self.weights, "--weights")
        if self.weights == "gpu" and self.stream_from_disk:
            raise UsageError("--stream-from-disk reads each block from disk when it is pruned; drop --weights gpu")
        if self.weights == "gpu" and self.device.type != "cuda":
            raise UsageError(f"--weights gpu places the model on a GPU, but --device is {self.device}; use --device "
                             "cuda or --weights auto")


@dataclass(frozen=True)
class SaveConfig:
    """What is written: the pruned model folder and the report file."""

    out: Path | None = None
    overwrite: bool = False
    """Replace a non-empty --out, or discard an unfinished run into it with other settings."""
    format: str = "dense"
    """dense (a Hugging Face folder with zeros) | compressed (packed; load with llmprune.load)."""
    report: Path | None = None

    def __post_init__(self) -> None:
        export.check_format(self.format)
        if self.report is not None and self.report.is_dir():
            raise UsageError(f"--report {self.report} is a folder; give a file path such as run.json")


@dataclass(frozen=True)
class PruneJob:
    """Everything ``workflow.run_prune`` needs."""

    model: str
    method: object
    """A method instance (``methods.get_method``), modifiers applied."""
    pattern: Pattern
    layerwise: OWL | list[float] | None
    calibration: Calibration
    calib_tokens: Path | None
    run: RunSettings
    eval: EvalSettings
    zero_shot: zeroshot.ZeroShotSettings | None
    save: SaveConfig
    data_dir: Path | None = None
    trust_remote_code: bool = False
    structure: Structured | None = None
    """Structured pruning (a smaller dense model) instead of a sparse mask; the method and pattern are then unused."""

    def __post_init__(self) -> None:
        check_combination(self.method, self.pattern, self.layerwise)
        if self.structure is not None:
            self._check_structured()
        if self.run.stream_from_disk:
            self._check_streaming()

    def _check_structured(self) -> None:
        """--structure removes channels, heads or blocks; the options of sparse masks do not apply to it."""
        def refuse(what: str) -> None:
            raise UsageError(f"--structure removes whole channels, heads or blocks; {what} is for sparse masks: "
                             "drop one of them")

        if not isinstance(self.pattern, Unstructured):
            refuse(f"--pattern {self.pattern}")
        if self.pattern.sparsity != 0.5:
            refuse("--sparsity (give the amount with --remove)")
        if self.layerwise is not None:
            refuse("--layerwise")
        if len(list(wrapped(self.method))) > 1 or getattr(self.method, "permute", False):
            refuse("--permute / --refine / --update (restoration is --restore)")
        if self.method.name != "wanda" or getattr(self.method, "variant", False):
            refuse(f"--method {self.method.name} (the score is --importance)")
        if self.run.stream_from_disk:
            refuse("--stream-from-disk")
        if self.save.format != "dense":
            raise UsageError("--structure saves a smaller dense model; drop --format or use --format dense")

    def _check_streaming(self) -> None:
        if self.save.out is None:
            raise UsageError("--stream-from-disk writes the pruned model block by block: give --out DIR")
        if self.eval.sets or self.zero_shot is not None:
            raise UsageError("--stream-from-disk never holds the whole model, so it cannot evaluate it: pass "
                             "--eval '' (and no --eval-tasks) and evaluate the saved folder with `llmprune eval --model DIR`")
        if self.save.format != "dense":
            raise UsageError("--stream-from-disk writes a dense Hugging Face folder; drop --format or use --format dense")

    @property
    def needs_calibration(self) -> bool:
        if self.structure is not None:
            return self.structure.needs_calibration
        return bool(self.method.needs) or isinstance(self.layerwise, OWL)

    @classmethod
    def from_flags(cls, *, model: str = "smollm2-135m", method: str = "wanda", sparsity: float = 0.5,
                   pattern: str = "unstructured", scope: str | None = None, layerwise: str = "uniform",
                   owl_m: float = 5.0, owl_lambda: float = 0.08, owl_variant: str | None = None,
                   permute: bool = False, update: str = "none", refine: str = "none",
                   dsnot_cycles: int | None = None, dsnot_threshold: float | None = None,
                   dsnot_variant: str | None = None, calib: str = "c4",
                   nsamples: int = 128, seqlen: int = 2048, seed: int = 0, calib_tokens: Path | None = None,
                   device: str = "auto", dtype: str = "auto", batch_size: int = 8, activations: str = "auto",
                   weights: str = "auto", stream_from_disk: bool = False, eval_sets: str = "wikitext2",
                   eval_seqlen: int | None = None, max_eval_windows: int | None = None, eval_tasks: str = "",
                   limit: int | None = None, eval_batch_size: int | None = None, out: Path | None = None,
                   overwrite: bool = False, format: str = "dense", report: Path | None = None,
                   data_dir: Path | None = None, trust_remote_code: bool = False, progress: bool = True,
                   evaluates: bool = True, structure: str | None = None, remove: float | None = None,
                   widths: str | None = None, importance: str = "wanda-sp", restore: str = "none",
                   width_multiple: int = 32, objective: str = "output", allocation: str = "uniform") -> PruneJob:
        """The job of `llmprune prune`'s flags, every string parsed here. ``evaluates``: False on the torchrun ranks
        that only take a share of the calibration (rank 0 evaluates)."""
        method_obj = get_method(method, permute=permute, update=update,
                                refine=_refine_of(refine, dsnot_cycles, dsnot_threshold, dsnot_variant))
        pattern_obj = parse_pattern(pattern, sparsity, scope)
        layerwise_obj = _layerwise_of(layerwise, owl_m, owl_lambda, owl_variant)
        calibration = Calibration(calib, nsamples, seqlen, seed)
        extra_sets, zs_tasks = zeroshot.split_task_list(eval_tasks, flag="--eval-tasks")
        sets = tuple(dict.fromkeys(parse_sets(eval_sets) + extra_sets))
        settings = EvalSettings(sets if evaluates else (), eval_seqlen or seqlen, max_eval_windows)
        zs = zeroshot.ZeroShotSettings(zs_tasks, limit, eval_batch_size) if zs_tasks and evaluates else None
        if batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
        dev = devices.resolve_device(device)
        run = RunSettings(dev, devices.resolve_dtype(dtype, dev), batch_size, activations, weights, stream_from_disk,
                          progress)
        save = SaveConfig(out, overwrite, format, report)
        structured = _structured_of(structure, remove, widths, importance, restore, width_multiple, objective,
                                    allocation)
        return cls(model, method_obj, pattern_obj, layerwise_obj, calibration, calib_tokens, run, settings, zs, save,
                   data_dir, trust_remote_code, structured)


def _structured_of(structure: str | None, remove: float | None, widths: str | None, importance: str, restore: str,
                   multiple: int, objective: str = "output", allocation: str = "uniform") -> Structured | None:
    """``--structure`` with its options; the options alone are refused."""
    if structure is None or not structure.strip():
        given = [flag for flag, value, default in (("--remove", remove, None), ("--widths", widths, None),
                                                   ("--importance", importance, "wanda-sp"),
                                                   ("--restore", restore, "none"), ("--width-multiple", multiple, 32),
                                                   ("--objective", objective, "output"),
                                                   ("--allocation", allocation, "uniform"))
                 if value != default]
        if given:
            raise UsageError(f"{', '.join(given)} set structured pruning: add --structure (e.g. --structure mlp,heads)")
        return None
    return Structured.parse(structure, remove, widths, importance, restore, multiple, objective, allocation)


def _refine_of(refine: str, cycles: int | None, threshold: float | None, variant: str | None) -> DSnoT | None:
    """``--refine`` with DSnoT's three options; the options alone are refused."""
    refine_obj = as_refine(refine)
    if refine_obj is None and (cycles is not None or threshold is not None or variant is not None):
        raise UsageError("--dsnot-cycles, --dsnot-threshold and --dsnot-variant set DSnoT's refinement: "
                         "add --refine dsnot")
    if refine_obj is None:
        return None
    defaults = DSnoT()
    return DSnoT(defaults.cycles if cycles is None else cycles, defaults.threshold if threshold is None else threshold,
                 defaults.variant if variant is None else variant.strip().lower())


def _layerwise_of(layerwise: str, m: float, lam: float, variant: str | None):
    """``--layerwise`` with OWL's options; ``--owl-variant`` without ``--layerwise owl`` is refused."""
    layerwise_obj = parse_layerwise(layerwise)
    if not isinstance(layerwise_obj, OWL):
        if variant is not None:
            raise UsageError("--owl-variant sets OWL's mapping of outlier ratios: add --layerwise owl")
        return layerwise_obj
    return OWL(m, lam, OWL.variant if variant is None else variant.strip().lower())


@dataclass(frozen=True)
class EvalJob:
    """Everything ``workflow.run_eval`` needs."""

    model: str
    eval: EvalSettings
    zero_shot: zeroshot.ZeroShotSettings | None
    device: torch.device
    dtype: torch.dtype
    report: Path | None = None
    data_dir: Path | None = None
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.eval.sets and self.zero_shot is None:
            raise UsageError("nothing to evaluate: give --tasks (e.g. --tasks boolq,rte,wikitext2) or --eval")
        if self.report is not None and self.report.is_dir():
            raise UsageError(f"--report {self.report} is a folder; give a file path such as eval.json")

    @classmethod
    def from_flags(cls, *, model: str, tasks: str, eval_sets: str | None, eval_seqlen: int, max_eval_windows: int | None,
                   limit: int | None, eval_batch_size: int | None, device: str, dtype: str, report: Path | None,
                   data_dir: Path | None, trust_remote_code: bool, progress: bool) -> EvalJob:
        """The job of `llmprune eval`'s flags; ``eval_sets`` None: wikitext2 when no --tasks are given."""
        ppl_sets, zs_tasks = zeroshot.split_task_list(tasks)
        if eval_sets is None:
            eval_sets = "" if tasks.strip() else "wikitext2"
        settings = EvalSettings(tuple(dict.fromkeys(parse_sets(eval_sets) + ppl_sets)), eval_seqlen, max_eval_windows)
        zs = zeroshot.ZeroShotSettings(zs_tasks, limit, eval_batch_size) if zs_tasks else None
        dev = devices.resolve_device(device)
        return cls(model, settings, zs, dev, devices.resolve_dtype(dtype, dev), report, data_dir, trust_remote_code,
                   progress)
