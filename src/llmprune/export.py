"""Save a pruned model: a plain Hugging Face folder (dense, exact zeros, safetensors), atomically."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UsageError
from .report import write_json

REPORT_NAME = "llmprune_report.json"
FORMATS = ("dense", "compressed")


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise UsageError(f"--format must be dense or compressed, got {fmt!r}")
    return fmt


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Validate ``--out`` before any work is done."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--out {out} exists and is not empty; choose another folder or pass --overwrite")
    parent = out.parent
    if not parent.is_dir():
        raise UsageError(f"--out {out}: the parent folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: the folder {parent} is not writable; choose a writable location")
    return out


def save_pruned(model, tokenizer, out: str | os.PathLike, report: dict, overwrite: bool = False,
                format: str = "dense", pattern=None) -> Path:
    """Write model + tokenizer + report to a temporary sibling, then rename it into place.

    ``format="compressed"`` stores the pruned Linears packed (see ``compressed``; needs ``pattern``)
    and adds the byte counts to the report under ``storage``.
    """
    out = check_output_dir(out, overwrite)
    check_format(format)
    if format == "compressed" and pattern is None:
        raise UsageError("--format compressed needs the pattern the model was pruned with")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if format == "compressed":
            from . import compressed

            report = {**report, "storage": compressed.save(model, tmp, pattern)}
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / REPORT_NAME, report)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
