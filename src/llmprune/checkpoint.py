"""Resumable runs: after every block its pruned state goes to a work folder, written by a background thread.

The work folder holds one safetensors shard per finished block (``model-block-00007.safetensors``:
the block's parameters and persistent buffers under their full state-dict names, see ``layout``)
and ``state.json`` (the settings, the number of finished blocks, their per-layer results and each
shard's sha256 and size). Each file is written atomically (temporary name, fsync, rename) and
``state.json`` last: it is the commit point, so a kill at any moment leaves the previous state whole.

No activations are stored: a resumed run captures the block-0 inputs again and re-runs only the
propagation forward of each finished block with its saved weights, the same operations in the same
order as the uninterrupted run, so it ends bit-identical to it. A run with other settings is
refused unless it may overwrite. With ``--out`` (dense format) the work folder then becomes the
output: the shards are written once (see ``export.finish_dense``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load

from .errors import UsageError
from .integrity import disk_error, tensor_bytes, write_bytes_atomic
from .layout import block_state, shard_name, write_shard

STATE_NAME = "state.json"
FORMAT = 2
IN_FLIGHT = 2
"""Block snapshots queued or being written at most (CPU memory stays near two blocks)."""
RESUME_HINT = "; the finished blocks are kept, re-run the same command to resume"


class Interrupted(Exception):
    """Ctrl-C arrived; the run stopped after saving the block in progress."""


def work_dir_for(out: str | os.PathLike) -> Path:
    """The work folder of an output folder: a hidden sibling, so the output itself only appears when complete."""
    out = Path(out).expanduser()
    return out.with_name(f".{out.name}.llmprune-work")


def tokens_sha256(tokens: torch.Tensor | None) -> str | None:
    if tokens is None:
        return None
    return hashlib.sha256(f"{tuple(tokens.shape)}|".encode() + tensor_bytes(tokens.long())).hexdigest()


def model_fingerprint(model: torch.nn.Module) -> str:
    """Config plus the dtype, shape and first/last bytes of every tensor: tells models apart cheaply."""
    cfg = model.config.to_dict() if hasattr(model, "config") else {}
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "transformers_version"}
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if not t.is_meta:  # a streamed model's blocks are on disk; their names and shapes still count
            digest.update(tensor_bytes(flat[:1024]) + tensor_bytes(flat[-1024:]))
    return digest.hexdigest()


def read_state(folder: Path) -> dict | None:
    path = Path(folder) / STATE_NAME
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except ValueError:
        return None  # cannot happen with atomic writes; treat as no progress
    return state if state.get("format") == FORMAT else None


def _differences(old: dict, new: dict) -> list[str]:
    return [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]


@dataclass
class Restored:
    done: int = 0
    """Number of finished blocks (0: start from the beginning)."""
    layers: list[dict] = field(default_factory=list)
    """Per-layer results of the finished blocks, as saved."""


class _HostBuffers:
    """Page-locked CPU buffers, reused, for snapshots of blocks that sit on a GPU: a copy into them is
    several times faster than into pageable memory. CPU tensors are taken as they are (the runner never
    changes a block after saving it)."""

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._ours: set[int] = set()
        self._lock = threading.Lock()

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cpu":
            return t.detach().contiguous()
        key = (tuple(t.shape), t.dtype)
        with self._lock:
            free = self._free.get(key)
            buf = free.pop() if free else None
        if buf is None:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            with self._lock:
                self._ours.add(id(buf))
        buf.copy_(t.detach())  # synchronous: the block may leave the device right after
        return buf

    def give_back(self, tensors: dict[str, torch.Tensor]) -> None:
        with self._lock:
            for t in tensors.values():
                if id(t) in self._ours:
                    self._free.setdefault((tuple(t.shape), t.dtype), []).append(t)


class Checkpoint:
    """The runner calls ``restore`` once, ``block_state`` for each finished block it replays, ``begin``
    before the first new block, ``save`` after each block; the caller ends with ``close``.

    ``writer=False`` (the other processes of a torchrun run) only reads the folder; ``barrier``, called
    by every process in ``begin``, keeps the writer from deleting stale files while another reads.
    """

    def __init__(self, folder: str | os.PathLike, settings: dict, overwrite: bool = False, writer: bool = True,
                 barrier=None) -> None:
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it will read back from JSON
        self.writer = writer
        self._barrier = barrier or (lambda: None)
        self._stale = False  # a previous run's files, to delete before the first save
        self._stop = False
        self.resumed_from = 0
        self.shards: dict[str, dict] = {}
        """File name -> {sha256, bytes, tensors} of every committed block shard."""
        self.bytes_written = 0
        self.wait_s = 0.0
        """Seconds the pruning thread waited for the writer (a full queue, the final drain)."""
        self._jobs: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(IN_FLIGHT)
        self._thread: threading.Thread | None = None
        self._host = _HostBuffers()
        self._error: BaseException | None = None
        state = read_state(self.folder)
        if state is not None and state.get("settings") != self.settings:
            if not overwrite:
                diff = ", ".join(_differences(state.get("settings") or {}, self.settings))
                raise UsageError(
                    f"an unfinished run with other settings (differs in: {diff}) is saved in {self.folder}; re-run its "
                    "command to resume it, or pass --overwrite (Python: overwrite=True) to discard it")
            self._stale = True
        elif state is None and self.folder.exists():
            self._stale = True  # killed before its first block finished

    def restore(self, total: int) -> Restored:
        """The finished blocks' count and results; every shard they need is present with its recorded size."""
        state = None if self._stale else read_state(self.folder)
        if state is None:
            return Restored()
        done = self.resumed_from = min(int(state["done"]), total)
        self.shards = {shard_name(i): state["shards"][shard_name(i)] for i in range(done) if shard_name(i) in state["shards"]}
        for i in range(done):
            name = shard_name(i)
            path = self.folder / name
            if name not in self.shards or not path.is_file() or path.stat().st_size != self.shards[name]["bytes"]:
                self._damaged(f"{name} is missing or has the wrong size")
        if self.writer and done:
            print(f"resuming from block {done} of {total} (saved progress in {self.folder})", file=sys.stderr, flush=True)
        return Restored(done, state["layers"])

    def block_state(self, index: int) -> dict[str, torch.Tensor]:
        """The saved tensors of finished block ``index`` (full names), checked against their sha256."""
        name = shard_name(index)
        try:
            data = (self.folder / name).read_bytes()
        except OSError as exc:
            self._damaged(f"{type(exc).__name__}: {exc.strerror or exc}")
        record = self.shards[name]
        if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            self._damaged(f"{name} does not match its sha256 in {STATE_NAME}")
        return load(data)

    def _damaged(self, why: str):
        raise UsageError(f"the saved progress in {self.folder} is damaged ({' '.join(why.split())[:160]}); "
                         "delete that folder to start again")

    def begin(self) -> None:
        """Every process has read what it needs: the writer removes stale files and starts its thread."""
        self._barrier()
        if not self.writer:
            return
        try:
            if self._stale:
                shutil.rmtree(self.folder, ignore_errors=True)
                self._stale = False
            self.folder.mkdir(parents=True, exist_ok=True)
            keep = {STATE_NAME, *self.shards}
            for path in self.folder.iterdir():  # temporary files of a kill, blocks never committed, a half finish
                if path.name not in keep:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError as exc:
            raise disk_error(exc, self.folder, RESUME_HINT) from None
        self._thread = threading.Thread(target=self._work, name="llmprune-checkpoint", daemon=True)
        self._thread.start()

    def save(self, index: int, block: torch.nn.Module, prefix: str, layers: list[dict], total: int) -> None:
        """Block ``index`` is finished: queue a CPU snapshot of its state for the writer."""
        if self.writer:
            self._raise_failure()
            t0 = time.perf_counter()
            self._slots.acquire()
            self.wait_s += time.perf_counter() - t0
            self._jobs.put((index, block_state(block, prefix, self._host.copy), list(layers), total))
        if self._stop and index + 1 < total:
            self.close()
            raise Interrupted(
                f"interrupted: blocks 0-{index} of {total} are finished and saved in {self.folder}; "
                f"run the same command again to continue from block {index + 1}")

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:
                    self._commit(*job)
            except BaseException as exc:  # surfaced in the pruning thread at its next save or close
                self._error = exc
            finally:
                self._host.give_back(job[1])
                self._slots.release()

    def _commit(self, index: int, tensors: dict, layers: list[dict], total: int) -> None:
        name = shard_name(index)
        record = write_shard(self.folder / name, tensors)
        shards = {**self.shards, name: record}
        state = (json.dumps({"format": FORMAT, "settings": self.settings, "done": index + 1, "blocks": total,
                             "layers": layers, "shards": shards}, indent=1) + "\n").encode()
        write_bytes_atomic(self.folder / STATE_NAME, state)
        self.shards = shards
        self.bytes_written += record["bytes"] + len(state)

    def tensor_sha256(self) -> dict[str, str]:
        """Name -> sha256 of every tensor in the committed shards (shards from before these were recorded: none)."""
        return {name: digest for rec in self.shards.values() for name, digest in rec.get("tensor_sha256", {}).items()}

    def close(self, quiet: bool = False) -> None:
        """Wait until every queued block is written; raise the writer's error unless ``quiet``."""
        if self._thread is not None:
            t0 = time.perf_counter()
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
            self.wait_s += time.perf_counter() - t0
        if not quiet:
            self._raise_failure()

    def _raise_failure(self) -> None:
        exc = self._error
        if exc is None:
            return
        if isinstance(exc, OSError):
            raise disk_error(exc, self.folder, RESUME_HINT) from None
        raise exc

    def discard(self) -> None:
        if self.writer:
            self.remove(self.folder)

    @staticmethod
    def remove(folder: str | os.PathLike | None) -> None:
        """Delete a work folder (once its output is saved, or when its blocks cannot be trusted)."""
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    @contextlib.contextmanager
    def stop_between_blocks(self):
        """First Ctrl-C: finish and save the block in progress, then raise ``Interrupted``; second: stop now."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._stop:
                raise KeyboardInterrupt
            self._stop = True
            print("\nstopping after the block in progress (Ctrl-C again to stop at once) ...", file=sys.stderr, flush=True)

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)
