"""The dense output's files: one safetensors shard per decoder block, a stem shard, and the index.

A block shard holds the block's state (parameters and persistent buffers) under the model's full
state-dict names (``model.layers.7.self_attn.q_proj.weight``); the stem shard holds every other
tensor except tied duplicates (a tied ``lm_head``), as ``save_pretrained`` leaves them out. In-memory
and streamed runs write the same files, and ``from_pretrained`` loads them. Models whose
``save_pretrained`` would write other names than their state dict (transformers renames some on
save) are detected by ``direct_layout_supported`` and saved with ``save_pretrained`` instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from .integrity import write_bytes_atomic
from .models import find_decoder

INDEX = "model.safetensors.index.json"
STEM = "model-stem.safetensors"


def shard_name(index: int) -> str:
    return f"model-block-{index:05d}.safetensors"


def block_prefixes(model: nn.Module) -> list[str]:
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in find_decoder(model)[1]]


def block_state(block: nn.Module, prefix: str, to_host=None) -> dict[str, torch.Tensor]:
    """A CPU snapshot of a block's parameters and persistent buffers under their full names
    (``to_host(tensor)`` makes each CPU copy; default ``.to("cpu")``)."""
    to_host = to_host or (lambda t: t.detach().to("cpu").contiguous())
    return {f"{prefix}.{n}": to_host(t) for n, t in block.state_dict().items()}


def local_state(saved: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one block shard under the block's own names."""
    return {n[len(prefix) + 1:]: t for n, t in saved.items()}


def tied_names(model: nn.Module) -> set[str]:
    """Parameter names that are a second name of an earlier parameter (e.g. a tied lm_head)."""
    seen, tied = set(), set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            tied.add(name)
        seen.add(id(param))
    return tied


def stem_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict tensor outside the decoder blocks, without tied duplicates (blocks may be on meta)."""
    prefixes = tuple(f"{p}." for p in block_prefixes(model))
    tied = tied_names(model)
    return {n: t.detach().to("cpu").contiguous() for n, t in model.state_dict().items()
            if not n.startswith(prefixes) and n not in tied}


# safetensors' dtype names; tensors are laid out by element size, largest first, so every one is aligned
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _raw(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _order(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))


def safetensors_parts(tensors: dict[str, torch.Tensor]) -> list:
    """A safetensors file (metadata ``format: pt``) as buffers: its header, then each tensor's memory.

    The same format ``safetensors.torch.save`` writes, without copying the tensors into one bytes
    object: writing and hashing the buffers release the GIL, so a background writer does not slow
    the pruning thread."""
    order = _order(tensors)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text, *(_raw(tensors[n]) for n in order)]


def _file_sha256(parts: list) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)  # releases the GIL on large buffers
    return digest.hexdigest()


HASH_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> dict:
    """Write ``tensors`` as a safetensors file atomically; its record: sha256 (of the bytes written), size, names,
    and the sha256 of each tensor's bytes (``integrity.tensor_sha256``: the report's weights hash reuses them).

    The file's hash and the tensors' run in side threads while the file is written (each about 1 GB/s on one
    core): the writer keeps up with a GPU's pruning only when the two passes over the bytes run side by side."""
    parts, names = safetensors_parts(tensors), _order(tensors)
    with ThreadPoolExecutor(1 + HASH_THREADS, thread_name_prefix="llmprune-sha256") as pool:
        whole = pool.submit(_file_sha256, parts)
        each = {name: pool.submit(lambda p: hashlib.sha256(p).hexdigest(), part)
                for name, part in zip(names, parts[1:])}
        write_bytes_atomic(path, parts)
        sha256, digests = whole.result(), {name: f.result() for name, f in each.items()}
    return {"sha256": sha256, "bytes": sum(len(p) for p in parts), "tensors": sorted(tensors),
            "tensor_sha256": dict(sorted(digests.items()))}


def index_payload(shards: dict[str, dict]) -> dict:
    weight_map = {name: file for file, rec in shards.items() for name in rec["tensors"]}
    return {"metadata": {"total_size": sum(rec["bytes"] for rec in shards.values())},
            "weight_map": dict(sorted(weight_map.items()))}


def direct_layout_supported(model: nn.Module) -> bool:
    """True when ``save_pretrained`` would write exactly the names the block and stem shards hold."""
    if getattr(model, "_keys_to_ignore_on_save", None) or _remote_code(model):
        return False
    try:
        from transformers.core_model_loading import revert_weight_conversion

        with torch.device("meta"):
            names = {n: torch.empty(0) for n in model.state_dict()}
        return set(revert_weight_conversion(model, dict(names))) == set(names)
    except Exception:  # an API this transformers does not have, or a conversion that needs real tensors
        return False


def _remote_code(model: nn.Module) -> bool:
    check = getattr(model, "is_remote_code", None)
    return bool(check()) if callable(check) else False
