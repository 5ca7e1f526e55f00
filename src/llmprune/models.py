"""The only place where architectures differ: where the decoder blocks live and what to prune."""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError

# attribute paths from the causal-LM wrapper to its decoder (the module that runs the blocks)
# and, inside it, to the ModuleList of blocks: Llama/Mistral/Qwen/Gemma/Phi, OPT, GPT-2, GPT-NeoX
_DECODERS = ("model", "model.decoder", "transformer", "gpt_neox", "model.language_model")
_BLOCK_LISTS = ("layers", "h", "blocks")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(decoder module whose forward runs the blocks, the ModuleList of blocks)."""
    for dpath in _DECODERS:
        decoder = _get(model, dpath)
        if not isinstance(decoder, nn.Module):
            continue
        for bpath in _BLOCK_LISTS:
            blocks = getattr(decoder, bpath, None)
            if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
                return decoder, blocks
    raise UsageError(
        f"unsupported architecture {type(model).__name__}: no decoder block list found "
        f"(looked for {', '.join(d + '.' + b for d in _DECODERS for b in _BLOCK_LISTS)}); "
        "llmprune supports Hugging Face causal LMs such as Llama, Mistral, Qwen, Gemma, OPT, GPT-2, GPT-NeoX"
    )


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2 style layer that stores its weight as [in_features, out_features]
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def prunable_layers(block: nn.Module) -> dict[str, nn.Module]:
    """The Linear (and GPT-2 Conv1D) layers of a block, in definition order."""
    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) or _is_conv1d(m)}
    if not layers:
        raise UsageError(f"unsupported architecture: block {type(block).__name__} has no Linear layers to prune")
    return layers


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (a view: writing into it updates the module)."""
    w = module.weight.data
    return w.t() if _is_conv1d(module) else w


def set_weight_matrix(module: nn.Module, new: torch.Tensor) -> None:
    weight_matrix(module).copy_(new)


def context_length(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def needs_bos(model: nn.Module) -> bool:
    """Gemma models are trained with a BOS token at the start of every sequence."""
    model_type = getattr(getattr(model, "config", None), "model_type", "") or ""
    return model_type.startswith("gemma")
