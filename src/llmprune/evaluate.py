"""Perplexity on non-overlapping windows of a token stream (the Wanda/SparseGPT protocol)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class Perplexity:
    perplexity: float
    seqlen: int
    windows: int
    tokens: int  # tokens whose next-token loss was scored


def windows_of(stream: torch.Tensor, seqlen: int, max_windows: int | None = None, bos_id: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[k, seqlen]``; with ``bos_id`` each window is BOS + seqlen-1 tokens."""
    body = seqlen - 1 if bos_id is not None else seqlen
    if bos_id is not None and stream.numel() and stream[0] == bos_id:
        stream = stream[1:]  # the tokenizer's own leading BOS; every window gets one below
    if stream.numel() < body:
        raise ValueError(f"the evaluation text has {stream.numel()} tokens, fewer than one window of {seqlen}")
    count = stream.numel() // body
    if max_windows is not None:
        count = min(count, max_windows)
    wins = stream[: count * body].reshape(count, body)
    if bos_id is not None:
        wins = torch.cat([torch.full((count, 1), bos_id, dtype=wins.dtype), wins], dim=1)
    return wins


def nll_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each sequence, in fp32: shape [batch]."""
    shift = logits[:, :-1].float()
    target = input_ids[:, 1:]
    loss = F.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1), reduction="none")
    return loss.reshape(target.shape).mean(dim=1)


def perplexity_from_nll(window_nll: torch.Tensor) -> float:
    """exp of the mean window loss: exactly the reference code's exp(sum(loss * seqlen) / (n * seqlen))."""
    return math.exp(window_nll.double().mean().item())


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, device: torch.device, batch_size: int = 4, progress: bool = True,
               desc: str = "perplexity") -> Perplexity:
    """Perplexity of ``model`` (already on ``device``) on the given windows."""
    losses = []
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", disable=not progress):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        losses.append(nll_from_logits(logits, batch).cpu())
        del logits
    nll = torch.cat(losses)
    return Perplexity(perplexity_from_nll(nll), windows.shape[1], windows.shape[0], windows.shape[0] * (windows.shape[1] - 1))
