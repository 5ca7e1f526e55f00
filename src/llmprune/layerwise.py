"""Per-block sparsity: uniform, a user list, or OWL (Yin et al. 2024, outlier-weighed layerwise sparsity).

OWL: a dense pass over the blocks gives each block's outlier ratio, the share of its Wanda scores
|W_ij| * ||X_j|| (all its Linears together) above ``m`` times their mean. Blocks with more outliers are
pruned less. Two mappings from ratios to sparsities (``OWL.variant``):
- "paper", as the OWL code maps them: the ratios min-max scaled onto [0, 2 lam], shifted to mean 1 - target
  (densities), that is sparsity_b = target - 2 lam (r_b - mean r) / (max r - min r) with the plain mean over
  blocks; the band is 2 lam wide, so a block can lie up to 2 lam from the target when the ratios are skewed;
- "llmprune": sparsity_b = target - lam (r_b - mean r) / max_b |r_b - mean r|, the mean weighted by the blocks'
  prunable parameter counts, so every block stays in [target - lam, target + lam], the farthest on the edge.
Both keep the (weighted) mean sparsity at the target; with blocks of equal size the two means agree.
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


VARIANTS = ("paper", "llmprune")
"""``OWL.variant``: the OWL code's mapping of outlier ratios to sparsities, or this library's band (docstring)."""


@dataclass(frozen=True)
class OWL:
    m: float = 5.0
    """A score is an outlier above ``m`` times its block's mean score."""
    lam: float = 0.08
    """The spread: the paper mapping's band is 2 lam wide; the llmprune one keeps blocks within target +- lam."""
    variant: str = "paper"
    """paper (the OWL code's min-max mapping) | llmprune (within target +- lam)."""

    def __post_init__(self) -> None:
        if not self.m > 0:
            raise UsageError(f"--owl-m must be > 0, got {self.m}")
        if not 0 <= self.lam < 1:
            raise UsageError(f"--owl-lambda must be in [0, 1), got {self.lam}")
        if self.variant not in VARIANTS:
            raise UsageError(f"--owl-variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}; "
                             "e.g. --owl-variant paper")


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
                   weights: Sequence[float] | None = None, variant: str = "paper") -> list[float]:
    """Per-block sparsities from outlier ratios by ``variant``'s mapping (module docstring); ``weights`` (block
    sizes) weigh the llmprune mean only. A sparsity outside [0, 1) is refused with one line."""
    out = _paper_mapping(ratios, target, lam) if variant == "paper" else _band_mapping(ratios, target, lam, weights)
    if not all(0 <= s < 1 for s in out):
        raise UsageError(f"--layerwise owl: a block's sparsity would be {min(out):.4f} .. {max(out):.4f}, outside "
                         f"[0, 1); use a smaller --owl-lambda than {lam}")
    return out


def _paper_mapping(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """target - 2 lam (r - mean r) / (max r - min r), the plain mean over blocks."""
    r = torch.tensor(ratios, dtype=torch.float64)
    span = r.max() - r.min()
    if span == 0:
        return [float(target)] * len(r)
    return (target - 2 * lam * (r - r.mean()) / span).tolist()


def _band_mapping(ratios: Sequence[float], target: float, lam: float,
                  weights: Sequence[float] | None = None) -> list[float]:
    """Outlier ratios mapped linearly into [target - lam, target + lam] with weighted mean = target."""
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
