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

    degree = 1
    """The term's degree in x: a token of weight w adds its input scaled by w ** (1 / degree) (``add_weighted``)."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.windows = 0
        self.weight_sum: float | None = None
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

    def add_weighted(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        """``add`` with token t weighted by ``weight[..., t, 0]``: the means become weighted means."""
        _add_weighted(self, x, weight)

    def tensors(self) -> list[torch.Tensor]:
        """The running sums; summing them over processes (with ``tokens``) combines shares of the data."""
        return [self.total]

    @property
    def count(self) -> float:
        """What the sums are divided by: the token count, or the sum of the token weights where they were weighted."""
        return _count(self)

    def _mean(self) -> torch.Tensor:
        return (self.total / self.count).float()


class InputNorms(_FeatureSums):
    """Mean of x_j^2 over calibration tokens, per input feature (Wanda's statistic)."""

    _term = staticmethod(torch.square)
    degree = 2

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
    mean_sq = norms.total / norms.count
    mean = means.total / means.count
    return (mean_sq - mean * mean).clamp_min(0).float()


class Hessian:
    """H = 2 X^T X / n over calibration tokens (SparseGPT's statistic)."""

    degree = 2

    def __init__(self, features: int, device: torch.device) -> None:
        self.xtx = torch.zeros(features, features, dtype=torch.float64, device=device)
        self.tokens = 0
        self.weight_sum: float | None = None
        self.memo: dict = {}  # values derived from the finished matrix, shared by the Linears that read it

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        self.xtx += gram_fp32(x)
        self.tokens += x.shape[0]

    def add_weighted(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        """``add`` with token t weighted by ``weight[..., t, 0]``: 2 sum_t w_t x_t x_t^T / sum_t w_t."""
        _add_weighted(self, x, weight)

    def tensors(self) -> list[torch.Tensor]:
        return [self.xtx]

    @property
    def count(self) -> float:
        return _count(self)

    @property
    def matrix(self) -> torch.Tensor:
        return (self.xtx * (2.0 / self.count)).float()


def _add_weighted(acc, x: torch.Tensor, weight: torch.Tensor) -> None:
    """A token of weight w enters ``acc``'s sum of a degree-k term as x * w ** (1/k); the weights are summed."""
    w = weight.float()
    acc.add(x.float() * (w.sqrt() if acc.degree == 2 else w))
    acc.weight_sum = (acc.weight_sum or 0.0) + float(w.expand(*x.shape[:-1], 1).double().sum())


def _count(acc) -> float:
    if acc.weight_sum is not None:
        return acc.weight_sum if acc.weight_sum > 0 else 1.0
    return max(acc.tokens, 1)


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
