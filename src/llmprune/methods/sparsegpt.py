"""SparseGPT (Frantar & Alistarh 2023): mask and OBS weight update from the Hessian 2X^TX/n.

Column blocks of ``blocksize``; within a block the unstructured mask compares
w^2 / [H^-1]_jj^2 across the block, an N:M mask is chosen every M columns from the
weights as updated so far; each pruned column's error is spread over the later columns.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import torch

from ..guards import NumericalError, NumericalWarning
from ..patterns import NM, Pattern, Unstructured, select


@dataclass(frozen=True)
class SparseGPT:
    name = "sparsegpt"
    needs = ("hessian",)
    default_scope = "matrix"  # of each column block, as in the paper
    blocksize: int = 128
    damp: float = 0.01

    def settings(self) -> dict:
        return {"blocksize": self.blocksize, "damp": self.damp}

    def prune(
        self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.float().clone()
        hinv = _inverse_cholesky(stats["hessian"].matrix, w, self.damp)
        rows, cols = w.shape
        keep = torch.ones_like(w, dtype=torch.bool)
        bs = self.blocksize
        if isinstance(pattern, NM) and bs % pattern.m:
            bs = pattern.m * max(1, bs // pattern.m)
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            w1, keep1 = w[:, i1:i2].clone(), keep[:, i1:i2]
            h1 = hinv[i1:i2, i1:i2]
            err = torch.zeros_like(w1)
            if isinstance(pattern, Unstructured):
                saliency = w1.pow(2) / h1.diagonal().pow(2).unsqueeze(0)
                keep1.copy_(select(saliency, pattern, self.default_scope))
            for i in range(i2 - i1):
                if isinstance(pattern, NM) and i % pattern.m == 0:
                    sl = slice(i, i + pattern.m)
                    saliency = w1[:, sl].pow(2) / h1.diagonal()[sl].pow(2).unsqueeze(0)
                    keep1[:, sl] = select(saliency, pattern)
                col = w1[:, i]
                q = col * keep1[:, i]
                e = (col - q) / h1[i, i]
                w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
                w1[:, i] = q
                err[:, i] = e
            w[:, i1:i2] = w1
            w[:, i2:] -= err @ hinv[i1:i2, i2:]
        w *= keep
        return w.to(weight.dtype), keep


DAMP_RETRIES = 4  # each retry multiplies the dampening by 10


def _inverse_cholesky(h: torch.Tensor, w: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of the dampened inverse Hessian; dead inputs are zeroed in ``w``.

    A Hessian that cannot be factorised with ``damp`` is retried with 10x, 100x... the dampening
    (a ``NumericalWarning`` says so); if none works, ``NumericalError``. Never a silent fallback.
    """
    h = h.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    mean = h.diagonal().mean()
    for attempt in range(DAMP_RETRIES + 1):
        used = damp * 10**attempt
        dampened = h.clone()
        dampened.diagonal().add_(used * mean)
        factor, info = torch.linalg.cholesky_ex(dampened)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                if attempt:
                    warnings.warn(NumericalWarning(
                        f"Hessian not positive definite with dampening {damp:g}; factorised with {used:g}"))
                return upper
    raise NumericalError(
        f"the Hessian cannot be factorised even with dampening {used:g} (tried {damp:g} x 10^0..{DAMP_RETRIES}); "
        "use more calibration data (--nsamples, --seqlen) or --dtype float32"
    )
