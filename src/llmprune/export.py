"""Save a pruned model: a plain Hugging Face folder (dense, exact zeros, safetensors), atomically.

Written into a hidden sibling, every file fsynced, a sha256 manifest written last, then renamed
into place: the folder either does not exist or is complete and checkable (``integrity.verify_output``).
A run with ``--out`` builds the output in its work folder: the block shards the checkpoint wrote
become the output's shards (``finish_dense``) and only the stem, index, config, tokenizer, report
and manifest are added. ``--format compressed`` and models that ``save_pretrained`` saves under
other names (see ``layout.direct_layout_supported``) are written again by ``stage_pruned`` instead,
so their runs write the weights twice (the block shards as checkpoint, then the output).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import compressed
from .checkpoint import STATE_NAME
from .errors import UsageError
from .integrity import MANIFEST_NAME, REPORT_NAME, disk_error, fsync_path, write_json_atomic, write_manifest
from .layout import INDEX, STEM, index_payload, stem_state, write_shard

__all__ = ["FORMATS", "MANIFEST_NAME", "REPORT_NAME", "Staged", "check_format", "check_output_dir", "finish_dense",
           "save_pruned", "seal", "stage_pruned"]
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


@dataclass
class Staged:
    """A complete output but for its report and manifest, in a hidden folder beside ``--out``."""

    folder: Path
    bytes_written: int
    """Bytes of the files written into ``folder`` by this step."""
    known: dict = field(default_factory=dict)
    """Relative path -> {sha256, bytes} of files whose hash is known from writing them."""
    storage: dict | None = None
    """``--format compressed``: the byte counts of ``compressed.save``."""


def finish_dense(work: Path, model, tokenizer, shards: dict[str, dict]) -> Staged:
    """Turn a work folder of block shards (``shards``: their records) into the output's files: the stem
    shard, the index, the config (and generation config) and the tokenizer. The block shards are not
    rewritten, so the weights are written once in the whole run."""
    try:
        stem = write_shard(work / STEM, stem_state(model))
        known = {**shards, STEM: stem}
        write_json_atomic(work / INDEX, index_payload(known))
        _save_config(model, work)
        if tokenizer is not None:
            tokenizer.save_pretrained(work)
    except OSError as exc:
        raise disk_error(exc, work, f"; the pruned blocks are kept in {work}: re-run the same command to finish") from None
    written = sum(p.stat().st_size for p in work.rglob("*") if p.is_file() and p.name not in shards
                  and p.name != STATE_NAME)
    return Staged(work, written, {k: {"sha256": v["sha256"], "bytes": v["bytes"]} for k, v in known.items()})


def _save_config(model, folder: Path) -> None:
    """The config files ``save_pretrained`` writes, with the same dtype and architecture fields."""
    model.config.dtype = str(model.dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if callable(getattr(model, "can_generate", None)) and model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(folder)


def stage_pruned(model, tokenizer, out: str | os.PathLike, overwrite: bool = False, format: str = "dense",
                 pattern=None, after_error: str = "", perms: dict | None = None) -> Staged:
    """Write model + tokenizer with ``save_pretrained`` (or ``compressed.save``) into a temporary sibling of ``out``.

    ``perms`` (compressed only): Linear name -> the input-column order its N:M mask is in
    (``PruneResult.permutations()``), stored with the weight.

    A failed write (e.g. no space left) raises a one-line ``UsageError`` (``after_error`` is appended
    to its message) and leaves nothing behind.
    """
    out = check_output_dir(out, overwrite)
    check_format(format)
    if format == "compressed" and pattern is None:
        raise UsageError("--format compressed needs the pattern the model was pruned with")
    _remove_stale_partials(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        storage = None
        if format == "compressed":
            storage = compressed.save(model, tmp, pattern, perms)
        else:
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise disk_error(exc, out, after_error) from None
        raise
    return Staged(tmp, sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file()), storage=storage)


def _readable_modes(folder: Path) -> None:
    """Every file gets the mode a plain new file gets here (0644 under umask 022): ``save_pretrained`` writes
    its weights 0600, so the model file alone was unreadable to other users of a shared output."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


def seal(staged: Staged, out: str | os.PathLike, report: dict, after_error: str = "") -> Path:
    """Add the report and the manifest (written last), drop the checkpoint state, rename the folder to ``out``.

    On failure the staged folder is removed unless it is a work folder (it then keeps its blocks to resume)."""
    out, folder = Path(out).expanduser(), staged.folder
    try:
        write_json_atomic(folder / REPORT_NAME, report)
        _readable_modes(folder)
        write_manifest(folder, staged.known, exclude={STATE_NAME})
        (folder / STATE_NAME).unlink(missing_ok=True)
        fsync_path(folder)
        move_into_place(folder, out)
        fsync_path(out.parent)
    except OSError as exc:
        raise disk_error(exc, out, after_error) from None
    finally:
        if folder.exists() and not (folder / STATE_NAME).exists():
            shutil.rmtree(folder, ignore_errors=True)
    return out


def save_pruned(model, tokenizer, out: str | os.PathLike, report: dict, overwrite: bool = False,
                format: str = "dense", pattern=None, after_error: str = "", perms: dict | None = None) -> Path:
    """Write model + tokenizer + report + manifest to a temporary sibling, then rename it into place.

    ``format="compressed"`` stores the pruned Linears packed (see ``compressed``; needs ``pattern``, and
    ``perms`` after ``--permute``: ``PruneResult.permutations()``) and adds the byte counts to the report
    under ``storage``. A failed write (e.g. no space left)
    raises a one-line ``UsageError`` (``after_error`` is appended to its message) and leaves nothing behind.
    """
    staged = stage_pruned(model, tokenizer, out, overwrite, format, pattern, after_error, perms)
    if staged.storage is not None:
        report = {**report, "storage": staged.storage}
    return seal(staged, out, report, after_error)


def move_into_place(tmp: Path, out: Path) -> None:
    """Rename a finished temporary folder to ``out``, replacing an old ``out`` only once the new one is there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
