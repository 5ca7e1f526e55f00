"""SparseGPT (Frantar & Alistarh 2023): mask and OBS weight update from the Hessian 2X^TX/n.

Column blocks of ``blocksize``; within a block the unstructured mask compares
w^2 / [H^-1]_jj^2 across the block, an N:M mask is chosen every M columns from the
weights as updated so far; each pruned column's error is spread over the later columns.

The paper's column-by-column update is computed in closed form: with U the upper Cholesky
factor of H^-1 restricted to the block, the errors E of one row solve the triangular system
E_S U_SS = W_S over that row's pruned columns S (forward substitution is exactly the
column loop). On a GPU all rows are solved in one batched triangular solve, so a block costs
a few large kernels instead of several small ones per column; on a CPU, where launches are
cheap and memory traffic is not, wide blocks use the column loop itself.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import torch

from ..guards import NumericalError, NumericalWarning
from ..patterns import NM, Pattern, select

_SOLVE_ELEMENTS = 1 << 25  # rows of a batched solve are chunked to about this many matrix entries


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
        hinv, dead = inverse_cholesky(stats["hessian"], self.damp)
        w[:, dead] = 0.0
        cols = w.shape[1]
        keep = torch.ones_like(w, dtype=torch.bool)
        nm = isinstance(pattern, NM)
        bs = self.blocksize
        if nm and bs % pattern.m:
            bs = pattern.m * max(1, bs // pattern.m)
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            u = hinv[i1:i2, i1:i2]
            w1, keep1 = w[:, i1:i2], keep[:, i1:i2]
            err = torch.empty_like(w1)
            if not nm:
                keep1.copy_(select(w1.pow(2) / u.diagonal().pow(2).unsqueeze(0), pattern, self.default_scope))
            step = pattern.m if nm else i2 - i1
            for a in range(0, i2 - i1, step):
                b = a + step
                sub, u_sub = w1[:, a:b], u[a:b, a:b]
                if nm:  # chosen from the weights as updated by all earlier columns
                    keep1[:, a:b] = select(sub.pow(2) / u_sub.diagonal().pow(2).unsqueeze(0), pattern)
                e = pruned_errors(sub, ~keep1[:, a:b], u_sub)
                err[:, a:b] = e
                sub.sub_(e @ u_sub).mul_(keep1[:, a:b])
                if b < i2 - i1:
                    w1[:, b:] -= e @ u[a:b, b:]
            w[:, i2:] -= err @ hinv[i1:i2, i2:]
        return w.to(weight.dtype), keep


def pruned_errors(w: torch.Tensor, pruned: torch.Tensor, u: torch.Tensor, batched: bool | None = None) -> torch.Tensor:
    """Per row r, errors e_r with e_r[S] U[S, S] = w_r[S] over the pruned columns S, zero elsewhere."""
    if batched is None:
        batched = w.is_cuda or w.shape[1] <= 16
    return _errors_batched(w, pruned, u) if batched else _errors_by_columns(w, pruned, u)


def _errors_by_columns(w: torch.Tensor, pruned: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Forward substitution one column at a time, vectorised over rows (the paper's loop)."""
    w = w.clone()
    e = torch.zeros_like(w)
    for k in range(w.shape[1]):
        e[:, k] = w[:, k] * pruned[:, k] / u[k, k]
        w[:, k + 1 :] -= e[:, k : k + 1] * u[k : k + 1, k + 1 :]
    return e


def _errors_batched(w: torch.Tensor, pruned: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """e_r A_r = w_r * p_r with A_r = U on S x S and the identity elsewhere, one solve batched over rows."""
    rows, s = w.shape
    out = torch.empty_like(w)
    chunk = max(1, _SOLVE_ELEMENTS // (s * s))
    for r1 in range(0, rows, chunk):
        p = pruned[r1 : r1 + chunk]
        a = torch.where(p.unsqueeze(2) & p.unsqueeze(1), u, 0.0)
        a.diagonal(dim1=1, dim2=2).add_(~p)  # identity on the kept columns
        rhs = (w[r1 : r1 + chunk] * p).unsqueeze(1)
        out[r1 : r1 + chunk] = torch.linalg.solve_triangular(a, rhs, upper=True, left=False).squeeze(1)
    return out


DAMP_RETRIES = 4  # each retry multiplies the dampening by 10


def inverse_cholesky(hessian, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(Upper Cholesky factor of the dampened inverse Hessian, mask of dead inputs).

    Computed once per statistic: Linears that read the same input (q/k/v, gate/up) share it.
    A Hessian that cannot be factorised with ``damp`` is retried with 10x, 100x... the dampening
    (a ``NumericalWarning`` says so, for every Linear that uses it); if none works,
    ``NumericalError``. Never a silent fallback.
    """
    key = ("inverse_cholesky", damp)
    if key not in hessian.memo:
        hessian.memo[key] = _factorise(hessian.matrix, damp)
    upper, dead, note = hessian.memo[key]
    if note:
        warnings.warn(NumericalWarning(note))
    return upper, dead


def _factorise(matrix: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    h = matrix.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    mean = h.diagonal().mean()
    for attempt in range(DAMP_RETRIES + 1):
        used = damp * 10**attempt
        dampened = h.clone()
        dampened.diagonal().add_(used * mean)
        factor, info = torch.linalg.cholesky_ex(dampened)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0 and bool(torch.isfinite(upper).all()):
                note = None
                if attempt:
                    note = f"Hessian not positive definite with dampening {damp:g}; factorised with {used:g}"
                return upper, dead, note
    raise NumericalError(
        f"the Hessian cannot be factorised even with dampening {used:g} (tried {damp:g} x 10^0..{DAMP_RETRIES}); "
        "use more calibration data (--nsamples, --seqlen) or --dtype float32"
    )
