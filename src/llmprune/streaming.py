"""Prune a model that does not fit in CPU memory: blocks are read from its safetensors files one at a
time; the checkpoint writes each pruned block to its own shard (see ``layout``), the output's files.

The model is built on the meta device (accelerate's ``init_empty_weights``: parameters take no
memory, buffers such as rotary frequencies are real); only the stem (embeddings, final norm,
lm_head) is read into memory. ``DiskBlocks`` is a runner placement: ``load`` reads one block's
tensors straight onto the compute device with safetensors' ``safe_open``, ``release`` returns its
parameters to the meta device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .layout import INDEX, block_prefixes, tied_names
from .models import find_decoder


def weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = folder / INDEX
    if index.is_file():
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if single.is_file():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {k: single for k in f.keys()}
    raise UsageError(f"--stream-from-disk needs a local model folder with safetensors weights; {folder} has none")


class _Reader:
    def __init__(self, folder: Path) -> None:
        self.files = weight_files(folder)
        self._open: dict[Path, object] = {}

    def get(self, name: str, device, dtype) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise UsageError(f"--stream-from-disk: tensor {name} is not in the model's safetensors files "
                             "(this architecture renames its checkpoint keys; load it without --stream-from-disk)")
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), "pt", device="cpu")
        t = self._open[path].get_tensor(name)
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    def close(self) -> None:
        """Drop the open files: their memory maps would otherwise keep every page read so far resident."""
        self._open.clear()


def open_model(folder: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False):
    """(model with its blocks on the meta device and its stem in memory, reader of the block tensors)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.eval()
    reader = _Reader(folder)
    _, blocks = find_decoder(model)
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    tied = tied_names(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in block_ids or name in tied:
            continue
        set_module_tensor_to_device(model, name, "cpu", value=reader.get(name, "cpu", dtype).clone())
        reader.close()  # one tensor's pages mapped at a time
    model.tie_weights()
    return model, reader


class DiskBlocks:
    """Runner placement: read a block from the source files (or from its saved shard on resume) onto the
    device; afterwards return its parameters to the meta device. The checkpoint writes the pruned blocks."""

    keeps_weights = False  # a finished block needs no reading unless its outputs are needed

    def __init__(self, model: nn.Module, reader: _Reader) -> None:
        self.reader = reader
        self.prefix = block_prefixes(model)
        self.dtype = next(find_decoder(model)[1][0].parameters()).dtype

    def load(self, index: int, block: nn.Module, device: torch.device, saved: dict | None = None) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in block.named_parameters():
            if saved is not None:
                value = saved[name].to(device)
            else:
                value = self.reader.get(f"{self.prefix[index]}.{name}", device, self.dtype)
            set_module_tensor_to_device(block, name, device, value=value)
        self.reader.close()

    def release(self, index: int, block: nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in list(block.named_parameters()):
            set_module_tensor_to_device(block, name, "meta")
