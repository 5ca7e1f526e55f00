"""Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreMethod


@dataclass(frozen=True)
class Wanda(ScoreMethod):
    name = "wanda"
    needs = ("norms",)
    default_scope = "row"

    def score(self, weight, stats) -> torch.Tensor:
        # mean over tokens of x_j^2; its square root is ||X_j||_2 up to a constant per matrix
        return weight.abs().float() * stats["norms"].mean_sq.sqrt().unsqueeze(0)
