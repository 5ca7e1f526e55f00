"""Module surgery for structured pruning: smaller Linears, fewer blocks, and a config that describes them.

The only place that knows how a Llama-like block lays out its heads and MLP channels. Every edit keeps
the model a standard transformers model of its own class: after ``write_config`` the in-memory model
and ``AutoModelForCausalLM.from_pretrained`` of its saved folder have the same modules and shapes.
Widths are uniform (the same in every block), so the standard config fields describe them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UsageError
from .models import find_decoder

ATTENTION = ("self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj")
MLP = ("mlp", ("gate_proj", "up_proj"), "down_proj")

BIAS_FLAGS = {
    "llama": {"heads": "attention_bias", "mlp": "mlp_bias"},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"heads": "attention_bias"},
    "gemma3_text": {"heads": "attention_bias"},
}
"""Supported model types, and the config flag (if any) that gives the consuming Linear of each part a bias.
Each flag gives every Linear of its part a bias (q/k/v/o, gate/up/down): the producers get zeros."""

NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma3_text": "Gemma 3"}


def text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def check_supported(model, flag: str = "--structure") -> str:
    """The model type, or a one-line refusal naming ``flag``."""
    model_type = getattr(text_config(model), "model_type", None)
    if model_type not in BIAS_FLAGS:
        raise UsageError(f"{flag}: structured pruning supports {', '.join(NAMES.values())} (Llama-family) models; "
                         f"{type(model).__name__} ({model_type}) is not one of them")
    return model_type


def bias_flag(model, part: str) -> str | None:
    """The config flag that gives ``part``'s (heads | mlp) consuming Linear a bias, None where there is none."""
    return BIAS_FLAGS[check_supported(model)].get(part)


@dataclass(frozen=True)
class Shape:
    """A block's widths and what one unit of each costs in parameters."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    block_params: int
    channel_params: int
    """Parameters of one MLP channel: its gate and up rows (and biases), its down_proj column."""
    group_params: int
    """Parameters of one KV group: its query heads' q rows, its k and v rows (and biases), its o_proj columns."""

    @property
    def heads_per_group(self) -> int:
        return self.heads // self.kv_heads


def _rows_cost(linear: nn.Linear, rows: int) -> int:
    return rows * (linear.in_features + (1 if linear.bias is not None else 0))


def shape_of(model) -> Shape:
    """The uniform widths of the model (read from its first block, checked on every block)."""
    cfg = text_config(model)
    blocks = find_decoder(model)[1]
    attn, mlp = parts(blocks[0])
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    q, k, v = (getattr(attn, n) for n in ATTENTION[1])
    group = _rows_cost(q, hd * heads // kv) + _rows_cost(k, hd) + _rows_cost(v, hd) + hd * heads // kv * attn.o_proj.out_features
    gate, up = (getattr(mlp, n) for n in MLP[1])
    channel = _rows_cost(gate, 1) + _rows_cost(up, 1) + mlp.down_proj.out_features
    sizes = {sum(p.numel() for p in b.parameters()) for b in blocks}
    if len(sizes) != 1 or any(parts(b)[1].down_proj.in_features != cfg.intermediate_size for b in blocks):
        raise UsageError("--structure: the blocks differ in width; structured pruning needs blocks of one shape")
    return Shape(cfg.hidden_size, cfg.intermediate_size, heads, kv, hd, len(blocks), sizes.pop(), channel, group)


def parts(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(attention module, MLP module) of a decoder block."""
    attn, mlp = getattr(block, ATTENTION[0], None), getattr(block, MLP[0], None)
    if attn is None or mlp is None or not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in (*MLP[1], MLP[2])):
        raise UsageError(f"--structure: block {type(block).__name__} has no self_attn/mlp with separate "
                         "q/k/v/o and gate/up/down Linears")
    return attn, mlp


def sliced_linear(linear: nn.Linear, rows=None, cols=None, weight=None, bias=None) -> nn.Linear:
    """A new Linear with the given rows and/or input columns of ``linear``; ``weight``/``bias`` replace the sliced
    values (``bias`` also adds one to a Linear that had none)."""
    w = linear.weight.data
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    w = weight.to(w.dtype) if weight is not None else w
    b = linear.bias.data if linear.bias is not None else None
    b = b[rows] if b is not None and rows is not None else b
    b = bias.to(w.dtype) if bias is not None else b
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b.to(w.device))
    return new


def keep_mlp_channels(block: nn.Module, kept: torch.Tensor, down_weight=None, down_bias=None) -> None:
    """Keep the intermediate channels ``kept``: gate/up rows and down_proj columns (``down_weight``/``down_bias``:
    the restored consuming weight [hidden, len(kept)] and an added bias)."""
    mlp = parts(block)[1]
    kept = kept.to(mlp.down_proj.weight.device)
    for name in MLP[1]:
        setattr(mlp, name, sliced_linear(getattr(mlp, name), rows=kept))
    mlp.down_proj = sliced_linear(mlp.down_proj, cols=kept, weight=down_weight, bias=down_bias)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(kept)


def group_channels(kept_groups: torch.Tensor, per_group: int) -> torch.Tensor:
    """The row (or column) indices of whole groups of ``per_group`` consecutive rows."""
    offsets = torch.arange(per_group, device=kept_groups.device)
    return (kept_groups.unsqueeze(1) * per_group + offsets).flatten()


def keep_kv_groups(block: nn.Module, kept_groups: torch.Tensor, shape: Shape, o_weight=None, o_bias=None) -> None:
    """Keep whole KV groups: their k/v heads, their query heads (q rows) and the matching o_proj columns."""
    attn = parts(block)[0]
    kept_groups = kept_groups.to(attn.o_proj.weight.device)
    q_rows = group_channels(kept_groups, shape.heads_per_group * shape.head_dim)
    kv_rows = group_channels(kept_groups, shape.head_dim)
    attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
    attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
    attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
    attn.o_proj = sliced_linear(attn.o_proj, cols=q_rows, weight=o_weight, bias=o_bias)


def drop_blocks(model, kept: list[int]) -> None:
    """Keep only the decoder blocks ``kept`` (in order); their layer indices, the per-layer attention types and
    the layer count of the config follow."""
    decoder, blocks = find_decoder(model)
    cfg = text_config(model)
    new = nn.ModuleList([blocks[i] for i in kept])
    for name, child in decoder.named_children():
        if child is blocks:
            setattr(decoder, name, new)
    for index, block in enumerate(new):
        for module in (block, getattr(block, ATTENTION[0], None)):
            if module is not None and hasattr(module, "layer_idx"):
                module.layer_idx = index
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    cfg.num_hidden_layers = len(kept)


def add_part_biases(model, part: str) -> None:
    """Give every Linear of ``part`` (heads | mlp) in every block a bias (zeros where it had none), as the config
    flag that ``write_config`` sets makes ``from_pretrained`` build them."""
    for block in find_decoder(model)[1]:
        module = parts(block)[0 if part == "heads" else 1]
        names = (*ATTENTION[1], ATTENTION[2]) if part == "heads" else (*MLP[1], MLP[2])
        for name in names:
            linear = getattr(module, name)
            if linear.bias is None:
                zeros = torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
                setattr(module, name, sliced_linear(linear, bias=zeros))


PER_LAYER_FIELD = "llmprune_intermediate_sizes"
"""Config field of a model whose blocks have different MLP widths (``--allocation adaptive``): one per block.
``intermediate_size`` then holds the widest, and ``llmprune.load`` builds each block to its own width."""


def write_config(model, intermediate: int | list[int], kv_heads: int, shape: Shape,
                 biased: tuple[str, ...] = ()) -> None:
    """The standard config fields of the new widths (``head_dim`` written out, as the head count no longer gives it);
    ``intermediate``: one width, or one per block (written to ``PER_LAYER_FIELD`` where they differ);
    ``biased``: the parts whose consuming Linears got a compensation bias."""
    cfg = text_config(model)
    sizes = [intermediate] if isinstance(intermediate, int) else list(intermediate)
    if len(set(sizes)) > 1:
        setattr(cfg, PER_LAYER_FIELD, sizes)
    elif hasattr(cfg, PER_LAYER_FIELD):
        delattr(cfg, PER_LAYER_FIELD)
    intermediate = max(sizes)
    cfg.intermediate_size = intermediate
    cfg.num_key_value_heads = kv_heads
    cfg.num_attention_heads = kv_heads * shape.heads_per_group
    cfg.head_dim = shape.head_dim
    for part in biased:
        flag = bias_flag(model, part)
        if flag is None:
            raise ValueError(f"{type(model).__name__} has no config flag for a bias on the {part} output")
        add_part_biases(model, part)
        setattr(cfg, flag, True)


def per_layer_sizes(config) -> list[int] | None:
    """The per-block MLP widths a config records (``PER_LAYER_FIELD``), or None for uniform widths."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    sizes = getattr(cfg, PER_LAYER_FIELD, None)
    return list(sizes) if sizes else None


def resize_mlps(model, sizes: list[int]) -> None:
    """Give block i's gate/up/down Linears ``sizes[i]`` intermediate channels (their first ones: the weights are
    meant to be loaded over them), so a model built from a per-layer config takes its saved tensors."""
    blocks = find_decoder(model)[1]
    if len(sizes) != len(blocks):
        raise UsageError(f"the config's {PER_LAYER_FIELD} gives {len(sizes)} widths for {len(blocks)} blocks")
    for block, size in zip(blocks, sizes):
        if size != parts(block)[1].down_proj.in_features:
            keep_mlp_channels(block, torch.arange(size))


def decoder_params(model) -> int:
    """Parameters of the decoder blocks."""
    return sum(p.numel() for b in find_decoder(model)[1] for p in b.parameters())


def model_params(model) -> int:
    """All parameters, tied ones once."""
    return sum(p.numel() for p in model.parameters())
