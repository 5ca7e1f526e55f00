"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row.

``variant=True`` is the paper's variant for unstructured sparsity: in each row the lowest scores are
pruned while their cumulative sum stays within alpha times the row's total, with one alpha per layer
found by bisection so the layer's sparsity comes within ``tol`` of the target (rows then differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..patterns import Unstructured
from .base import ScoreMethod


@dataclass(frozen=True)
class Wanda(ScoreMethod):
    name = "wanda"
    needs = ("norms",)
    default_scope = "row"
    permute: bool = False
    variant: bool = False
    tol: float = 1e-3

    def score(self, weight, stats) -> torch.Tensor:
        # mean over tokens of x_j^2; its square root is ||X_j||_2 up to a constant per matrix
        return weight.abs().float() * stats["norms"].mean_sq.sqrt().unsqueeze(0)

    def mask(self, scores, pattern):
        if self.variant and isinstance(pattern, Unstructured):
            return cumulative_mask(scores, pattern.sparsity, self.tol)
        return super().mask(scores, pattern)

    def settings(self) -> dict:
        return {**super().settings(), "variant": self.variant}


def cumulative_mask(scores: torch.Tensor, sparsity: float, tol: float = 1e-3, steps: int = 60) -> torch.Tensor:
    """Prune, per row, the lowest scores whose running sum is <= alpha * row sum; alpha by bisection."""
    values, order = torch.sort(scores.double(), dim=1, stable=True)
    cum = values.cumsum(dim=1)
    total = cum[:, -1:]
    lo, hi = 0.0, 1.0
    pruned = cum < 0
    for _ in range(steps):
        alpha = (lo + hi) / 2
        pruned = cum <= alpha * total
        current = pruned.double().mean().item()
        if abs(current - sparsity) <= tol:
            break
        lo, hi = (lo, alpha) if current > sparsity else (alpha, hi)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order, ~pruned)
    return keep
