"""Prune a model that does not fit in CPU memory: blocks are read from its safetensors files one at a
time and the pruned model is written shard by shard (one file per block).

The model is built on the meta device (accelerate's ``init_empty_weights``: parameters take no
memory, buffers such as rotary frequencies are real); only the stem (embeddings, final norm,
lm_head) is read into memory. ``DiskBlocks`` is a runner placement: ``load`` reads one block's
tensors straight onto the compute device with safetensors' ``safe_open``, ``release`` writes the
pruned block to its output shard and returns its parameters to the meta device.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .models import find_decoder
from .report import write_json

INDEX = "model.safetensors.index.json"


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
    tied = _tied_names(model)
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in block_ids or name in tied:
            continue
        set_module_tensor_to_device(model, name, "cpu", value=reader.get(name, "cpu", dtype).clone())
        reader.close()  # one tensor's pages mapped at a time
    model.tie_weights()
    return model, reader


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that are a second name of an earlier parameter (e.g. a tied lm_head)."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


class DiskBlocks:
    """Runner placement: read a block from the source files, write it pruned to ``out`` (a temporary folder)."""

    def __init__(self, model: nn.Module, reader: _Reader, out: Path | None) -> None:
        self.reader, self.out = reader, out
        names = {id(m): n for n, m in model.named_modules()}
        _, blocks = find_decoder(model)
        self.prefix = [names[id(b)] for b in blocks]
        self.dtype = next(blocks[0].parameters()).dtype
        self.weight_map: dict[str, str] = {}
        if out is not None:  # None: another process writes the result
            out.mkdir(parents=True, exist_ok=True)

    def load(self, index: int, block: nn.Module, device: torch.device) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for name, _ in block.named_parameters():
            value = self.reader.get(f"{self.prefix[index]}.{name}", device, self.dtype)
            set_module_tensor_to_device(block, name, device, value=value)
        self.reader.close()

    def release(self, index: int, block: nn.Module) -> None:
        from accelerate.utils import set_module_tensor_to_device
        from safetensors.torch import save_file

        if self.out is not None:
            file = f"block-{index:05d}.safetensors"
            tensors = {f"{self.prefix[index]}.{n}": p.detach().to("cpu").contiguous()
                       for n, p in block.named_parameters()}
            save_file(tensors, str(self.out / file), metadata={"format": "pt"})
            self.weight_map.update(dict.fromkeys(tensors, file))
        for name, _ in list(block.named_parameters()):
            set_module_tensor_to_device(block, name, "meta")

    def finish(self, model: nn.Module, tokenizer, report: dict | None) -> None:
        """Write the stem shard, the index, config and tokenizer next to the block shards."""
        from safetensors.torch import save_file

        _, blocks = find_decoder(model)
        block_ids = {id(p) for b in blocks for p in b.parameters()}
        tied = _tied_names(model)
        rest = {n: p.detach().contiguous() for n, p in model.named_parameters(remove_duplicate=False)
                if id(p) not in block_ids and n not in tied}
        save_file(rest, str(self.out / "stem.safetensors"), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(rest, "stem.safetensors"))
        total = sum(os.path.getsize(self.out / f) for f in set(self.weight_map.values()))
        write_json(self.out / INDEX, {"metadata": {"total_size": total}, "weight_map": dict(sorted(self.weight_map.items()))})
        model.config.save_pretrained(self.out)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.out)
        if report is not None:
            from .export import REPORT_NAME

            write_json(self.out / REPORT_NAME, report)
        from .integrity import fsync_path, write_manifest

        write_manifest(self.out)  # last: `llmprune eval` / `load` refuse a folder without it
        fsync_path(self.out)


def partial_dir(out: Path) -> Path:
    return out.with_name(f".{out.name}.partial-{os.getpid()}")
