"""Compact storage of a pruned model in one safetensors file, and the loader that rebuilds it.

Per pruned Linear weight [rows, cols]:
  N:M       the N kept values of every group of M (``.nm_values`` [rows, cols*N/M]) and each one's
            position in its group, ceil(log2 M) bits, packed into bytes (``.nm_index``); 2:4 in bf16
            stores 50% of the values + 1 bit per weight, i.e. 0.5625x.
  N:M, permuted  (``--permute``: the mask is N:M only in a permuted input-column order) the same two parts
            of the weight with its columns in that order, ``weight[:, perm]``, and the order itself
            (``.perm`` [cols], int16 up to 32768 columns, else int32; position p holds column perm[p]).
            Decoding scatters the columns back: the dense weight in its stored order, bit for bit.
  unstructured  a bitmask of the non-zeros, 1 bit per weight packed (``.mask``), and the non-zero
            values in order (``.values``); or CSR (``.csr_values``, ``.csr_cols``, ``.csr_rows``)
            where that is smaller (below ~6% density in bf16).
Every other tensor is stored as is. The header's metadata holds, per weight, its encoding, shape,
dtype and the sha256 of each stored part; loading checks all of them, and the pattern, before
decoding. Kept values come back bit for bit; pruned weights come back as +0.0 (a -0.0 left by
multiplying with a mask counts as zero, as the N:M definition says).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UsageError
from .integrity import REPORT_NAME, verify_output
from .models import find_decoder, prunable_layers
from .patterns import NM, Pattern, parse_pattern
from .permute import index_dtype, is_order

WEIGHTS_NAME = "model.llmprune.safetensors"
FORMAT = "llmprune-compressed-1"


# ---------------------------------------------------------------- bit packing


def _bits_for(m: int) -> int:
    need = max(1, math.ceil(math.log2(m)))
    for b in (1, 2, 4, 8):
        if need <= b:
            return b
    raise UsageError(f"N:M storage supports M <= 256, got M={m}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Little-endian packing of integer codes < 2**bits into uint8, 8/bits codes per byte."""
    per = 8 // bits
    flat = codes.reshape(-1).to(torch.int32)
    flat = torch.nn.functional.pad(flat, (0, (-flat.numel()) % per))
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (flat.reshape(-1, per) << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    codes = (packed.to(torch.int32).reshape(-1, 1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count]


# ---------------------------------------------------------------- encodings


def check_nm(weight: torch.Tensor, pattern: NM, name: str) -> None:
    rows, cols = weight.shape
    if cols % pattern.m:
        raise UsageError(f"{name}: width {cols} is not a multiple of M={pattern.m}; it cannot be {pattern} sparse")
    counts = (weight.reshape(rows, cols // pattern.m, pattern.m) != 0).sum(-1)
    bad = (counts > pattern.n).nonzero()
    if len(bad):
        r, g = bad[0].tolist()
        raise UsageError(f"{name} is not {pattern} sparse: row {r}, columns {g * pattern.m}..{g * pattern.m + pattern.m - 1} "
                         f"hold {int(counts[r, g])} non-zeros; prune it with --pattern {pattern} first")


def encode_nm(weight: torch.Tensor, pattern: NM, name: str) -> tuple[dict, dict]:
    check_nm(weight, pattern, name)
    n, m = pattern.n, pattern.m
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // m, m)
    # the non-zeros first (in position order), then zero slots to fill N; then positions ascending
    key = (groups == 0).to(torch.int16) * m + torch.arange(m, dtype=torch.int16)
    idx = key.argsort(dim=-1)[..., :n].sort(dim=-1).values
    values = groups.gather(-1, idx).reshape(rows, -1)
    bits = _bits_for(m)
    return ({"nm_values": values.contiguous(), "nm_index": pack_bits(idx, bits)},
            {"encoding": "nm", "n": n, "m": m, "bits": bits})


def decode_nm(parts: dict, meta: dict, shape, name: str) -> torch.Tensor:
    n, m, bits = meta["n"], meta["m"], meta["bits"]
    rows, cols = shape
    values = parts["nm_values"]
    if tuple(values.shape) != (rows, cols // m * n):
        raise UsageError(f"{name}: stored values have shape {tuple(values.shape)}, expected {(rows, cols // m * n)}; the file is corrupt")
    idx = unpack_bits(parts["nm_index"], bits, values.numel()).reshape(rows, cols // m, n).long()
    if (idx >= m).any() or (n > 1 and (idx[..., 1:] <= idx[..., :-1]).any()):
        raise UsageError(f"{name}: the {n}:{m} index metadata is invalid (a group repeats a position or points "
                         f"outside its {m} weights); the file is corrupt or not {n}:{m}")
    out = torch.zeros(rows, cols // m, m, dtype=values.dtype)
    out.scatter_(-1, idx, values.reshape(rows, cols // m, n))
    return out.reshape(rows, cols)


def encode_permuted_nm(weight: torch.Tensor, pattern: NM, perm: torch.Tensor, name: str) -> tuple[dict, dict]:
    """``encode_nm`` of ``weight[:, perm]`` (N:M in that column order) and the order ``perm``."""
    cols = weight.shape[1]
    if not is_order(perm, cols):
        raise UsageError(f"{name}: its input permutation is not an order of its {cols} columns")
    perm = perm.to("cpu", torch.int64)
    parts, meta = encode_nm(weight[:, perm], pattern, f"{name} (in its input permutation)")
    return {**parts, "perm": perm.to(index_dtype(cols))}, {**meta, "encoding": "nm-permuted"}


def decode_permuted_nm(parts: dict, meta: dict, shape, name: str) -> torch.Tensor:
    """The weight in its stored column order: ``decode_nm`` gives ``weight[:, perm]``, scattered back."""
    perm = parts.get("perm")
    if perm is None or not is_order(perm, shape[1]):
        raise UsageError(f"{name}: the stored input permutation is not an order of its {shape[1]} columns; "
                         "the file is corrupt")
    permuted = decode_nm(parts, meta, shape, name)
    out = torch.empty_like(permuted)
    out[:, perm.long()] = permuted
    return out


def encode_sparse(weight: torch.Tensor) -> tuple[dict, dict]:
    """Bitmask + values, or CSR where that is smaller."""
    rows, cols = weight.shape
    mask = weight != 0
    values = weight[mask]
    nnz = values.numel()
    col_dtype = torch.int16 if cols <= 2**15 else torch.int32
    bitmask_bytes = math.ceil(weight.numel() / 8)
    csr_bytes = nnz * col_dtype.itemsize + (rows + 1) * 8
    if csr_bytes < bitmask_bytes:
        cols_idx = mask.nonzero()[:, 1].to(col_dtype)
        row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)])
        return {"csr_values": values, "csr_cols": cols_idx, "csr_rows": row_ptr}, {"encoding": "csr"}
    return {"values": values, "mask": pack_bits(mask, 1)}, {"encoding": "bitmask"}


def decode_sparse(parts: dict, meta: dict, shape, dtype, name: str) -> torch.Tensor:
    rows, cols = shape
    out = torch.zeros(rows, cols, dtype=dtype)
    if meta["encoding"] == "bitmask":
        if parts["mask"].numel() != math.ceil(rows * cols / 8):
            raise UsageError(f"{name}: the bitmask has {parts['mask'].numel()} bytes, expected {math.ceil(rows * cols / 8)}; the file is corrupt")
        mask = unpack_bits(parts["mask"], 1, rows * cols).bool().reshape(rows, cols)
        if int(mask.sum()) != parts["values"].numel():
            raise UsageError(f"{name}: the bitmask marks {int(mask.sum())} weights but {parts['values'].numel()} values are stored; the file is corrupt")
        out[mask] = parts["values"]
        return out
    ptr, cols_idx, values = parts["csr_rows"], parts["csr_cols"].long(), parts["csr_values"]
    if ptr.numel() != rows + 1 or int(ptr[-1]) != values.numel() or cols_idx.numel() != values.numel() \
            or (ptr[1:] < ptr[:-1]).any() or (cols_idx.numel() and (cols_idx.min() < 0 or cols_idx.max() >= cols)):
        raise UsageError(f"{name}: the CSR row pointers or column indices are inconsistent; the file is corrupt")
    row_of = torch.repeat_interleave(torch.arange(rows), ptr[1:] - ptr[:-1])
    out[row_of, cols_idx] = values
    return out


# ---------------------------------------------------------------- save / load


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def pruned_weight_names(model) -> set[str]:
    """State-dict names of the weights that pruning touches (the decoder blocks' Linears)."""
    prefix_of = {id(m): n for n, m in model.named_modules()}
    names = set()
    for block in find_decoder(model)[1]:
        for layer in prunable_layers(block).values():
            if type(layer).__name__ != "Conv1D":  # GPT-2's transposed layers are stored as they are
                names.add(f"{prefix_of[id(layer)]}.weight")
    return names


def _encode_pruned(t: torch.Tensor, pattern: Pattern, perm: torch.Tensor | None, name: str) -> tuple[dict, dict]:
    if not isinstance(pattern, NM):
        return encode_sparse(t)  # every weight stored as it is: no column order needed
    return encode_nm(t, pattern, name) if perm is None else encode_permuted_nm(t, pattern, perm, name)


def save(model, folder: str | os.PathLike, pattern: Pattern, perms: dict[str, torch.Tensor] | None = None) -> dict:
    """Write config + one compressed safetensors file into ``folder``; returns the byte counts.

    ``perms``: Linear name (``model.layers.0.mlp.down_proj``) -> the input-column order its N:M mask is in
    (``PruneResult.permutations()``); those weights are stored N:M in that order, with it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    pruned = pruned_weight_names(model)
    perms = {f"{k}.weight": v for k, v in (perms or {}).items()}
    tensors, entries, seen = {}, {}, {}
    linear_dense = linear_stored = 0
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if t.data_ptr() in seen and t.numel():  # tied weights are stored once
            entries[name] = {"encoding": "alias", "of": seen[t.data_ptr()]}
            continue
        seen[t.data_ptr()] = name
        if name in pruned:
            parts, meta = _encode_pruned(t, pattern, perms.get(name), name)
            linear_dense += t.numel() * t.element_size()
            linear_stored += sum(p.numel() * p.element_size() for p in parts.values())
        else:
            parts, meta = {"data": t}, {"encoding": "plain"}
        meta.update(shape=list(t.shape), dtype=str(t.dtype).replace("torch.", ""),
                    sha256={k: _sha(p) for k, p in parts.items()})
        entries[name] = meta
        tensors.update({f"{name}.{k}": p.contiguous() for k, p in parts.items()})
    header = {"format": FORMAT, "pattern": str(pattern), "tensors": json.dumps(entries)}
    save_file(tensors, folder / WEIGHTS_NAME, metadata=header)
    return {"format": "compressed", "pattern": str(pattern), "linear_dense_bytes": linear_dense,
            "linear_stored_bytes": linear_stored, "linear_ratio": linear_stored / linear_dense if linear_dense else None,
            "file_bytes": (folder / WEIGHTS_NAME).stat().st_size}


def is_compressed(folder: str | os.PathLike) -> bool:
    return (Path(folder) / WEIGHTS_NAME).is_file()


def _decode(parts: dict, meta: dict, shape, dtype, name: str, path: Path) -> torch.Tensor:
    encoding = meta["encoding"]
    if encoding == "plain":
        return parts["data"]
    if encoding == "nm":
        return decode_nm(parts, meta, shape, name)
    if encoding == "nm-permuted":
        return decode_permuted_nm(parts, meta, shape, name)
    if encoding in ("bitmask", "csr"):
        return decode_sparse(parts, meta, shape, dtype, name)
    raise UsageError(f"{path}: {name} has an encoding this llmprune does not know ({encoding!r}); "
                     "upgrade llmprune to read it")


def _checked_parts(path: Path, stored: dict, name: str, meta: dict, only=None) -> dict:
    """The stored parts of tensor ``name`` (those in ``only``, or all), each checked against its sha256."""
    parts = {}
    for part, digest in meta["sha256"].items():
        if only is not None and part not in only:
            continue
        t = stored.get(f"{name}.{part}")
        if t is None:
            raise UsageError(f"{path}: {name}.{part} is missing; the file is corrupt")
        if _sha(t) != digest:
            raise UsageError(f"{path}: {name}.{part} fails its checksum; the file is corrupt")
        parts[part] = t
    return parts


def _read(path: Path, keep=lambda key: True) -> tuple[dict, dict, dict]:
    """(header, entries, the stored tensors whose key ``keep`` accepts) of a compressed file; refused when it is
    not one or is damaged."""
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise UsageError(f"{path} is not an llmprune compressed file (format {header.get('format')!r})")
            entries = json.loads(header["tensors"])
            stored = {k: f.get_tensor(k) for k in f.keys() if keep(k)}
    except UsageError:
        raise
    except Exception as exc:  # safetensors refuses truncated or malformed files
        raise UsageError(f"{path} is truncated or corrupt and cannot be read ({type(exc).__name__}: {exc})") from exc
    return header, entries, stored


def read_state_dict(path: str | os.PathLike) -> tuple[dict, dict]:
    """Decode a compressed file into a dense state dict, checking checksums, shapes and the pattern."""
    path = Path(path)
    header, entries, stored = _read(path)
    state = {}
    for name, meta in entries.items():
        if meta["encoding"] == "alias":
            continue
        parts = _checked_parts(path, stored, name, meta)
        shape, dtype = tuple(meta["shape"]), getattr(torch, meta["dtype"])
        state[name] = _decode(parts, meta, shape, dtype, name, path)
        if tuple(state[name].shape) != shape or state[name].dtype != dtype:
            raise UsageError(f"{path}: {name} decodes to {tuple(state[name].shape)} {state[name].dtype}, expected {shape} {dtype}")
    for name, meta in entries.items():
        if meta["encoding"] == "alias":
            state[name] = state[meta["of"]]
    return state, header


def permutations(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Linear name -> its stored input permutation (int64), for the weights saved N:M in a permuted column order:
    what ``inference.sparsify(model, perms=...)`` takes for a model from ``load(folder)``. A dense folder holds
    none: one whose report marks permuted Linears is refused."""
    folder = Path(folder).expanduser()
    if not is_compressed(folder):
        if _report_permuted(folder):
            raise UsageError(f"{folder} is a dense folder: it does not hold the input permutations of its --permute "
                             "Linears; prune again with --format compressed")
        return {}
    path = folder / WEIGHTS_NAME
    _, entries, stored = _read(path, keep=lambda key: key.endswith(".perm"))
    out = {}
    for name, meta in entries.items():
        if meta["encoding"] == "nm-permuted":
            perm = _checked_parts(path, stored, name, meta, only=("perm",)).get("perm")
            if perm is None or not is_order(perm, meta["shape"][1]):
                raise UsageError(f"{path}: {name}: the stored input permutation is not an order of its columns; "
                                 "the file is corrupt")
            out[name.removesuffix(".weight")] = perm.long()
    return out


def load(folder: str | os.PathLike, dtype: torch.dtype | None = None, check_pattern: bool = True,
         verify: bool = True):
    """Load a saved llmprune model (dense or compressed folder) as a Hugging Face causal LM.

    A compressed folder is rebuilt from its config on empty (meta) weights, then filled with the
    decoded dense weights (``permutations(folder)`` gives the input orders of its ``--permute`` Linears).
    A dense folder whose report names an N:M pattern is checked against it (but for the Linears the report
    marks permuted: their order is not in a dense folder).
    ``verify``: refuse a folder whose files do not match its sha256 manifest (incomplete or altered).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder).expanduser()
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder} holds no config.json; give a folder written by `llmprune prune --out`")
    if verify:
        verify_output(folder, label="load")
    if not is_compressed(folder):
        from .loading import load_per_layer

        model = load_per_layer(folder, dtype)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or "auto")
        pattern = _report_pattern(folder)
        if check_pattern and isinstance(pattern, NM):
            # a dense folder does not hold the orders of --permute: those weights are N:M only in theirs
            unchecked = {f"{name}.weight" for name in _report_permuted(folder)}
            for name, t in model.state_dict().items():
                if name in pruned_weight_names(model) and name not in unchecked:
                    check_nm(t, pattern, name)
        return model.eval()
    state, _ = read_state_dict(folder / WEIGHTS_NAME)
    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise UsageError(f"{folder / WEIGHTS_NAME} lacks {len(missing)} tensors of this model, e.g. {sorted(missing)[0]}")
    if dtype is not None:  # the stored tensors only: buffers computed at init (rotary frequencies) keep their
        # dtype, as from_pretrained(dtype=...) keeps them, so both folders evaluate the same
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()


def _report(folder: Path) -> dict:
    try:
        report = json.loads((folder / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _report_pattern(folder: Path):
    text = _report(folder).get("pattern")
    try:
        return parse_pattern(text, 0.5) if text else None
    except (ValueError, UsageError):
        return None


def _report_permuted(folder: Path) -> set[str]:
    """Names of the Linears the report marks ``permuted`` (N:M in a permuted input-column order)."""
    return {row["name"] for row in _report(folder).get("layers") or [] if isinstance(row, dict) and row.get("permuted")}
