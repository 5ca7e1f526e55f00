"""Running statistics of a Linear layer's input, always accumulated in fp32."""

from __future__ import annotations

import torch


class InputNorms:
    """Mean of x_j^2 over calibration tokens, per input feature (Wanda's statistic)."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.sum_sq = torch.zeros(features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum_sq += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    @property
    def mean_sq(self) -> torch.Tensor:
        return self.sum_sq / max(self.tokens, 1)


class Hessian:
    """H = 2 X^T X / n over calibration tokens (SparseGPT's statistic)."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.xtx = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    @property
    def matrix(self) -> torch.Tensor:
        return self.xtx * (2.0 / max(self.tokens, 1))


STATISTICS = {"norms": InputNorms, "hessian": Hessian}
