"""The run's report: every setting and measurement, as JSON."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ._version import __version__


def versions() -> dict[str, str]:
    import transformers

    return {"llmprune": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc), None where that cannot be read: what an outside clock
    would time, interpreter start-up and imports included."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def perplexity_table(dense: dict, pruned: dict) -> dict:
    out = {}
    for name in dict.fromkeys([*dense, *pruned]):
        ref = pruned.get(name) or dense.get(name)
        out[name] = {
            "dense": dense[name].perplexity if name in dense else None,
            "pruned": pruned[name].perplexity if name in pruned else None,
            "seqlen": ref.seqlen,
            "windows": ref.windows,
        }
    return out


def _layer_row(r) -> dict:
    row = {"name": r.name, "shape": list(r.shape), "sparsity": r.sparsity}
    if r.perm is not None:
        row["permuted"] = True  # N:M in a permuted input-column order (stored with --format compressed)
    if r.warnings:
        row["warnings"] = r.warnings
    return row


def zero_shot_table(dense: dict | None, pruned: dict | None) -> dict:
    """Merge the dense and pruned results of ``zeroshot.evaluate_zero_shot`` into one report section."""
    runs = {k: v for k, v in (("dense", dense), ("pruned", pruned)) if v}
    if not runs:
        return {}
    first = next(iter(runs.values()))
    metrics = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "time_s")
    tasks = {}
    for name, info in first["tasks"].items():
        tasks[name] = {"version": info["version"], "source": info["source"], "samples": info["samples"]}
        for label, run in runs.items():
            tasks[name][label] = {k: run["tasks"][name][k] for k in metrics}
    return {"harness": first["harness"], "tasks": tasks, "mean": {label: run["mean"] for label, run in runs.items()}}


def build_report(*, model: dict, result, device, dtype, times: dict, peak: dict, dense_ppl: dict, pruned_ppl: dict,
                 eval_settings=None, zero_shot: dict | None = None, extra: dict | None = None) -> dict:
    pattern = result.pattern
    report = {
        "model": model,
        "method": result.method,
        "method_settings": result.method_settings,
        "pattern": str(pattern),
        "sparsity_target": pattern.target,
        "sparsity_overall": result.sparsity_overall,
        "calibration": result.calibration,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "layers": [_layer_row(r) for r in result.layers],
        "time": times,
        "peak_memory_bytes": peak,
        "memory_estimate_bytes": getattr(result, "memory_estimate", None),
        "perplexity": perplexity_table(dense_ppl, pruned_ppl),
        "warnings": result.warnings,
        "resumed_from_block": result.resumed_from_block,
        "determinism": result.determinism,
        "versions": versions(),
    }
    return _with_evaluation(report, zero_shot, eval_settings, extra)


def build_structured_report(*, model: dict, result, device, dtype, times: dict, peak: dict, dense_ppl: dict,
                            pruned_ppl: dict, eval_settings=None, zero_shot: dict | None = None,
                            extra: dict | None = None) -> dict:
    """The report of a structured run: its widths per block, parameters before and after, the fraction removed."""
    report = {
        "model": model,
        "method": "structured",
        "structured": result.to_report(),
        "calibration": result.calibration,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "time": times,
        "peak_memory_bytes": peak,
        "perplexity": perplexity_table(dense_ppl, pruned_ppl),
        "warnings": list(result.warnings),
        "versions": versions(),
    }
    return _with_evaluation(report, zero_shot, eval_settings, extra)


def _with_evaluation(report: dict, zero_shot: dict | None, eval_settings, extra: dict | None) -> dict:
    """The parts every report ends with: zero-shot results, the evaluation settings, and the caller's extras."""
    if zero_shot:
        report["zero_shot"] = zero_shot
    if eval_settings is not None:
        report["evaluation"] = {"sets": list(eval_settings.sets), "seqlen": eval_settings.seqlen,
                                "max_windows": eval_settings.max_windows}
    report.update(extra or {})
    return report


def write_json(path: str | os.PathLike, payload: dict) -> None:
    """Write atomically: a temporary file beside the target, fsync, then rename."""
    from .integrity import write_json_atomic

    write_json_atomic(Path(path), payload)
