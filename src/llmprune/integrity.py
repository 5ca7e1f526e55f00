"""Durable files: atomic writes with fsync, a sha256 manifest of a saved folder, and content hashes.

A saved output folder holds ``llmprune_manifest.json`` (sha256 and size of every other file),
written last; a folder without it, or whose files no longer match it, is refused on load.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import torch

from .errors import UsageError

MANIFEST_NAME = "llmprune_manifest.json"
REPORT_NAME = "llmprune_report.json"


def fsync_path(path: Path) -> None:
    """Flush a file or a folder's entries to disk (folders: where the OS allows opening them)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a folder
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data) -> None:
    """Temporary file beside ``path``, fsync, rename, fsync the folder: complete or absent.

    ``data``: bytes, or a list of buffers (bytes, memoryviews) written one after another."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            for chunk in data if isinstance(data, list) else [data]:
                fh.write(chunk)  # large writes go straight to the file, without the GIL
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload) -> None:
    write_bytes_atomic(path, (json.dumps(payload, indent=2) + "\n").encode())


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (read in place on the CPU: no second copy)."""
    flat = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(flat.numpy()).hexdigest()


def state_sha256(model: torch.nn.Module, known: dict[str, str] | None = None) -> str:
    """sha256 over every tensor of the state dict: one line ``name|dtype|shape|sha256 of its bytes`` per tensor,
    in name order.

    Independent of the file format and of where the tensors live: two models with this hash equal are
    bit-identical. The tensors are hashed in parallel threads (hashlib releases the GIL), so a 7B model
    costs seconds on a many-core host instead of tens. ``known`` (name -> ``tensor_sha256``) gives digests computed
    when those tensors were written (the pruned blocks' shards); they are not read again.
    """
    from concurrent.futures import ThreadPoolExecutor

    known = known or {}
    items = sorted(model.state_dict().items())
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(lambda item: known.get(item[0]) or tensor_sha256(item[1]), items))
    lines = "".join(f"{name}|{t.dtype}|{tuple(t.shape)}|{d}\n" for (name, t), d in zip(items, digests))
    return hashlib.sha256(lines.encode()).hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def write_manifest(folder: Path, known: dict | None = None, exclude: set[str] = frozenset()) -> dict:
    """fsync every file of ``folder`` (but ``exclude``), then write the manifest of their sha256 (itself fsynced).

    ``known`` (relative path -> {sha256, bytes}) gives hashes computed when those files were written:
    a file of the recorded size is not read again (a model's shards are most of its bytes)."""
    known = known or {}
    files = {}
    for path in _files(folder):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        fsync_path(path)
        size = path.stat().st_size
        entry = known.get(rel)
        digest = entry["sha256"] if entry is not None and entry["bytes"] == size else file_sha256(path)
        files[rel] = {"sha256": digest, "bytes": size}
    manifest = {"format": 1, "files": files}
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return manifest


def verify_output(folder: str | os.PathLike, label: str = "--model") -> None:
    """Refuse a folder written by llmprune that is incomplete or whose files changed since."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        if (folder / REPORT_NAME).is_file():
            raise UsageError(f"{label} {folder}: a llmprune output without {MANIFEST_NAME}, so it may be incomplete; "
                             "prune again into a new --out folder")
        return  # not written by llmprune: nothing to check against
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"{label} {folder}: {MANIFEST_NAME} is unreadable; prune again into a new --out folder") from None
    fix = f"prune again, or delete {MANIFEST_NAME} to load it unchecked"
    for rel, entry in files.items():
        path = folder / rel
        if not path.is_file():
            raise UsageError(f"{label} {folder}: {rel} is missing (the output is incomplete); {fix}")
        if path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            raise UsageError(f"{label} {folder}: {rel} does not match its checksum in {MANIFEST_NAME} "
                             f"(altered or damaged); {fix}")
    extra = [p.relative_to(folder).as_posix() for p in _files(folder)
             if p.relative_to(folder).as_posix() not in files]
    if extra:
        raise UsageError(f"{label} {folder}: {extra[0]} is not in {MANIFEST_NAME} (files were added after saving); "
                         f"remove it, or {fix}")


def check_writable(path: Path, flag: str) -> None:
    """Refuse, before any work, an output file that could not be written at the end: its folder is made if
    missing and a probe file is created and removed in it (a permission check alone is blind for root)."""
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, "the file is read-only")
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write there ({exc.strerror or exc}); choose a writable "
                         "location") from None


def disk_error(exc: OSError, where: Path, after: str = "") -> UsageError:
    """A one-line UsageError for a failed write (no space, read-only, quota)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        problem = "no space left on the device"
        fix = "free some space or choose a folder on another disk"
    else:
        problem = exc.strerror or str(exc)
        fix = "check the path and its permissions"
    return UsageError(f"writing {where} failed: {problem}; {fix}{after}")
