"""Save a pruned model: a plain Hugging Face folder (dense, exact zeros, safetensors), atomically.

Written into a temporary sibling, every file fsynced, a sha256 manifest written last, then renamed
into place: the folder either does not exist or is complete and checkable (``integrity.verify_output``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import UsageError
from .integrity import MANIFEST_NAME, REPORT_NAME, disk_error, fsync_path, write_json_atomic, write_manifest

__all__ = ["FORMATS", "MANIFEST_NAME", "REPORT_NAME", "check_format", "check_output_dir", "save_pruned"]
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Temporary siblings left by a killed save (their process is gone)."""
    for path in out.parent.glob(f".{out.name}.partial-*"):
        pid = path.name.rpartition("-")[2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def save_pruned(model, tokenizer, out: str | os.PathLike, report: dict, overwrite: bool = False,
                format: str = "dense", pattern=None, after_error: str = "") -> Path:
    """Write model + tokenizer + report + manifest to a temporary sibling, then rename it into place.

    ``format="compressed"`` stores the pruned Linears packed (see ``compressed``; needs ``pattern``)
    and adds the byte counts to the report under ``storage``. A failed write (e.g. no space left)
    raises a one-line ``UsageError`` (``after_error`` is appended to its message) and leaves nothing behind.
    """
    out = check_output_dir(out, overwrite)
    check_format(format)
    if format == "compressed" and pattern is None:
        raise UsageError("--format compressed needs the pattern the model was pruned with")
    _remove_stale_partials(out)
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
        write_json_atomic(tmp / REPORT_NAME, report)
        write_manifest(tmp)
        fsync_path(tmp)
        move_into_place(tmp, out)
        fsync_path(out.parent)
    except OSError as exc:
        raise disk_error(exc, out, after_error) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename a finished temporary folder to ``out``, replacing an old ``out`` only once the new one is there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
