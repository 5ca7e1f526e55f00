"""Magnitude pruning: |W|, compared across the whole matrix (the paper's baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreMethod


@dataclass(frozen=True)
class Magnitude(ScoreMethod):
    name = "magnitude"
    needs = ()
    default_scope = "matrix"
    permute: bool = False

    def score(self, weight, stats) -> torch.Tensor:
        return weight.abs().float()
