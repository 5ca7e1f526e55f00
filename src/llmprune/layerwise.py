"""Per-block sparsity: uniform, a user list, or OWL (Yin et al. 2024, outlier-weighed layerwise sparsity).

OWL: a dense pass over the blocks gives each block's outlier ratio, the share of its Wanda scores
|W_ij| * ||X_j|| (all its Linears together) above ``m`` times their mean. Blocks with more outliers are
pruned less: sparsity_b = target - lam * (r_b - mean r) / max_b |r_b - mean r|, where the mean is
weighted by the blocks' prunable parameter counts. So the weighted mean sparsity is the target exactly
and every block stays in [target - lam, target + lam], the farthest block on the edge of the band.
(The OWL code min-max scales the ratios onto a band of width 2*lam and then shifts it by the mean,
which can leave a block outside [target - lam, target + lam]; here the band is kept.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .capture import collect_statistics
from .errors import UsageError
from .models import find_decoder, prunable_layers, weight_matrix


@dataclass(frozen=True)
class OWL:
    m: float = 5.0
    lam: float = 0.08

    def __post_init__(self) -> None:
        if not self.m > 0:
            raise UsageError(f"--owl-m must be > 0, got {self.m}")
        if not 0 <= self.lam < 1:
            raise UsageError(f"--owl-lambda must be in [0, 1), got {self.lam}")


def parse_layerwise(text: str | None) -> OWL | str | list[float] | None:
    """``None``/'uniform' -> None; 'owl' -> OWL(); a comma list or a file (JSON list, or numbers
    separated by commas or lines) -> per-block sparsities."""
    if text is None or str(text).strip().lower() in ("", "uniform"):
        return None
    text = str(text).strip()
    if text.lower() == "owl":
        return OWL()
    path = Path(text)
    if path.is_file():
        raw = path.read_text()
        try:
            values = json.loads(raw)
        except json.JSONDecodeError:
            values = [v for v in raw.replace("\n", ",").split(",") if v.strip()]
    else:
        values = [v for v in text.split(",") if v.strip()]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        raise UsageError(f"--layerwise must be 'owl', 'uniform', a comma list of sparsities or a file of them, "
                         f"got {text!r}") from None
    for v in out:
        if not 0 <= v < 1:
            raise UsageError(f"--layerwise: every sparsity must be in [0, 1), got {v}")
    return out


def owl_sparsities(ratios: Sequence[float], target: float, lam: float,
                   weights: Sequence[float] | None = None) -> list[float]:
    """Map outlier ratios linearly into [target - lam, target + lam] with weighted mean = target."""
    r = torch.tensor(ratios, dtype=torch.float64)
    w = torch.ones_like(r) if weights is None else torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    dev = r - (w * r).sum()
    span = dev.abs().max()
    if span == 0:
        return [float(target)] * len(r)
    s = target - lam * dev / span
    s = s + (target - (w * s).sum())  # remove the last rounding error of the weighted mean
    return s.tolist()


def outlier_ratio(scores: torch.Tensor, m: float) -> float:
    """Share of ``scores`` above ``m`` times their mean."""
    scores = scores.double().flatten()
    return float((scores > m * scores.mean()).double().mean())


@torch.no_grad()
def block_outlier_ratios(model, tokens: torch.Tensor, device: torch.device, batch_size: int, m: float,
                         progress: bool = True) -> list[float]:
    """Dense pass: per block, the outlier ratio of its Linears' Wanda scores; nothing is pruned."""
    from tqdm.auto import tqdm

    from .runner import _block_output, capture_block_inputs

    _, blocks = find_decoder(model)
    hidden, calls = capture_block_inputs(model, tokens, batch_size, device)
    ratios = []
    for index, block in enumerate(tqdm(blocks, desc="owl outlier ratios", unit="block", disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        layers = prunable_layers(block)
        with collect_statistics(layers, ("norms",), stop_early=False) as collector:
            for i, h in enumerate(hidden):
                call = calls[h.shape[0]][index]
                hidden[i] = _block_output(block(h, *call.args, **call.kwargs))
                collector.end_call()
        scores = [(weight_matrix(layer).abs().float()
                   * collector.for_layer(name)["norms"].mean_sq.sqrt().unsqueeze(0)).flatten()
                  for name, layer in layers.items()]
        ratios.append(outlier_ratio(torch.cat(scores), m))
        block.to(home)
    return ratios


def block_sizes(model) -> list[int]:
    """Prunable parameters per block."""
    _, blocks = find_decoder(model)
    return [sum(weight_matrix(layer).numel() for layer in prunable_layers(b).values()) for b in blocks]
