"""Running statistics of a Linear layer's input: fp32 per batch, summed over batches in fp64.

Each ``add`` computes its batch's contribution in fp32 (bf16/fp16 products are exact in fp32)
and adds it to an fp64 total. Sums of a few fp32 terms are exact in fp64 unless their
magnitudes differ by ~2^29, so the totals do not depend on the order in which batches are
added: several processes that each see a share of the batches and sum their totals
(``all_reduce``) get the same statistic, bit for bit, as one process that saw them all.
"""

from __future__ import annotations

import torch


class _FeatureSums:
    """fp64 running sum over calibration tokens of a per-feature term of the inputs (``_term``), and the counts of
    tokens and of windows (the leading dimension of a ``[windows, tokens, features]`` input; a 2-D input is one)."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.windows = 0
        self.memo: dict = {}

    @staticmethod
    def _term(part: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add(self, x: torch.Tensor) -> None:
        self.windows += x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, x.shape[-1])
        for part in x.split(4096):  # bounded fp32 temporaries
            self.total += self._term(part.float()).sum(dim=0)
        self.tokens += x.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        """The running sums; summing them over processes (with ``tokens``) combines shares of the data."""
        return [self.total]

    def _mean(self) -> torch.Tensor:
        return (self.total / max(self.tokens, 1)).float()


class InputNorms(_FeatureSums):
    """Mean of x_j^2 over calibration tokens, per input feature (Wanda's statistic)."""

    _term = staticmethod(torch.square)

    @property
    def sum_sq(self) -> torch.Tensor:
        """Sum of x_j^2 over calibration tokens, fp32."""
        return self.total.float()

    @property
    def mean_sq(self) -> torch.Tensor:
        return self._mean()


class InputMeans(_FeatureSums):
    """Mean of x_j over calibration tokens, per input feature (DSnoT's statistic, with ``InputNorms``)."""

    @staticmethod
    def _term(part: torch.Tensor) -> torch.Tensor:
        return part

    @property
    def mean(self) -> torch.Tensor:
        return self._mean()

    @property
    def per_window(self) -> torch.Tensor:
        """Sum of x_j over a window's tokens, averaged over the windows, fp32 (the DSnoT code's scale)."""
        return (self.total / max(self.windows, 1)).float()


def feature_variance(norms: InputNorms, means: InputMeans) -> torch.Tensor:
    """Var(x_j) = E[x_j^2] - E[x_j]^2 over calibration tokens, from the fp64 sums, fp32 (never negative)."""
    mean_sq = norms.total / max(norms.tokens, 1)
    mean = means.total / max(means.tokens, 1)
    return (mean_sq - mean * mean).clamp_min(0).float()


class Hessian:
    """H = 2 X^T X / n over calibration tokens (SparseGPT's statistic)."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.xtx = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.memo: dict = {}  # values derived from the finished matrix, shared by the Linears that read it

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.xtx += gram_fp32(x)
        self.tokens += x.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [self.xtx]

    @property
    def matrix(self) -> torch.Tensor:
        return (self.xtx * (2.0 / max(self.tokens, 1))).float()


def gram_fp32(x: torch.Tensor) -> torch.Tensor:
    """x^T x accumulated in fp32; half-precision inputs on a GPU use the tensor cores (exact products)."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(x.T, x, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            pass
    x = x.float()
    return x.T @ x


STATISTICS = {"norms": InputNorms, "means": InputMeans, "hessian": Hessian}
