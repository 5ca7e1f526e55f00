"""Resumable runs: after every block, its pruned weights and the next block's inputs go to a work folder.

Files in the work folder (all safetensors or JSON, each written atomically with fsync):
``block-00007.safetensors`` (the pruned weights of block 7), ``inputs-00008.safetensors`` (the
exact inputs of block 8, one tensor per calibration batch) and ``state.json`` (the settings, the
number of finished blocks and their per-layer results), rewritten last: it is the commit point,
so a kill at any moment leaves the previous state intact. A run with the same settings resumes
from the last finished block and ends bit-identical to a run never interrupted; a run with other
settings is refused unless it may overwrite.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from .errors import UsageError
from .integrity import disk_error, tensor_bytes, write_bytes_atomic, write_json_atomic

STATE_NAME = "state.json"
FORMAT = 1


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
        digest.update(tensor_bytes(flat[:1024]) + tensor_bytes(flat[-1024:]))
    return digest.hexdigest()


def _differences(old: dict, new: dict) -> list[str]:
    return [k for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)]


@dataclass
class Restored:
    done: int = 0
    """Number of finished blocks (0: start from the beginning)."""
    layers: list[dict] = field(default_factory=list)
    """Per-layer results of the finished blocks, as saved."""
    inputs: list[torch.Tensor] | None = None
    """Exact inputs of block ``done`` per calibration batch (None when the method needs none)."""


class Checkpoint:
    """The runner calls ``restore`` once before the first block and ``save`` after each block."""

    def __init__(self, folder: str | os.PathLike, settings: dict, overwrite: bool = False) -> None:
        self.folder = Path(folder)
        self.settings = json.loads(json.dumps(settings, default=str))  # as it will read back from JSON
        self._stale = False  # a previous run's files, to delete before the first save
        self._stop = False
        self.resumed_from = 0
        state = self._read_state()
        if state is not None and state.get("settings") != self.settings:
            if not overwrite:
                diff = ", ".join(_differences(state.get("settings") or {}, self.settings))
                raise UsageError(
                    f"an unfinished run with other settings (differs in: {diff}) is saved in {self.folder}; re-run its "
                    "command to resume it, or pass --overwrite (Python: overwrite=True) to discard it")
            self._stale = True
        elif state is None and self.folder.exists():
            self._stale = True  # killed before its first block finished

    def _read_state(self) -> dict | None:
        path = self.folder / STATE_NAME
        if not path.is_file():
            return None
        try:
            state = json.loads(path.read_text())
        except ValueError:
            return None  # cannot happen with atomic writes; treat as no progress
        return state if state.get("format") == FORMAT else None

    def restore(self, blocks: torch.nn.ModuleList) -> Restored:
        """Load the finished blocks' weights into ``blocks``; the saved inputs of the next block."""
        state = None if self._stale else self._read_state()
        if state is None:
            return Restored()
        done = self.resumed_from = int(state["done"])
        try:
            for index in range(done):
                weights = load_file(self.folder / f"block-{index:05d}.safetensors")
                block = blocks[index]
                for name, tensor in weights.items():
                    block.get_parameter(name).data.copy_(tensor)
            inputs = None
            if state.get("has_inputs") and done < len(blocks):
                saved = load_file(self.folder / f"inputs-{done:05d}.safetensors")
                inputs = [saved[str(i)] for i in range(len(saved))]
        except Exception as exc:  # a file removed or damaged by hand: never resume from half a state
            raise UsageError(f"the saved progress in {self.folder} is damaged ({type(exc).__name__}: "
                             f"{' '.join(str(exc).split())[:120]}); delete that folder to start again") from None
        return Restored(done, state["layers"], inputs)

    def save(self, index: int, block: torch.nn.Module, layer_names, inputs: list[torch.Tensor] | None,
             layers: list[dict], total: int) -> None:
        """Block ``index`` is finished: its pruned weights, the next block's inputs, then the state."""
        try:
            if self._stale:
                shutil.rmtree(self.folder, ignore_errors=True)
                self._stale = False
            self.folder.mkdir(parents=True, exist_ok=True)
            weights = {f"{n}.weight": block.get_submodule(n).weight.detach().cpu().contiguous() for n in layer_names}
            write_bytes_atomic(self.folder / f"block-{index:05d}.safetensors", save(weights))
            if inputs is not None:
                payload = {str(i): h.detach().cpu().contiguous() for i, h in enumerate(inputs)}
                write_bytes_atomic(self.folder / f"inputs-{index + 1:05d}.safetensors", save(payload))
            write_json_atomic(self.folder / STATE_NAME, {
                "format": FORMAT, "settings": self.settings, "done": index + 1, "blocks": total,
                "has_inputs": inputs is not None, "layers": layers})
            (self.folder / f"inputs-{index:05d}.safetensors").unlink(missing_ok=True)
        except OSError as exc:
            raise disk_error(exc, self.folder, "; the finished blocks are kept, re-run the same command to resume") from None
        if self._stop and index + 1 < total:
            raise Interrupted(
                f"interrupted: blocks 0-{index} of {total} are finished and saved in {self.folder}; "
                f"run the same command again to continue from block {index + 1}")

    def discard(self) -> None:
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
