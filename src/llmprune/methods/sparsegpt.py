"""SparseGPT (Frantar & Alistarh 2023): mask and OBS weight update from the Hessian 2X^TX/n.

Column blocks of ``blocksize``; within a block the unstructured mask compares
w^2 / [H^-1]_jj^2 across the block, an N:M mask is chosen every M columns from the
weights as updated so far; each pruned column's error is spread over the later columns.

With U the upper Cholesky factor of H^-1 restricted to the block, the rows of a block are
independent: the errors E of one row solve E_S U_SS = W_S over that row's pruned columns S
(forward substitution is exactly the column loop). Two solvers of a block:

- ``triton`` (CUDA tensors, where triton imports): one kernel per block, each program walks
  the columns for a tile of rows held in registers (``sparsegpt_kernel``);
- ``torch``: on a GPU all rows are solved in one batched triangular solve (per block, or per
  N:M group); on a CPU, where launches are cheap and memory traffic is not, wide blocks use
  the column loop itself.

``solver="auto"`` takes triton for CUDA tensors when it imports, else torch. Both give the
same masks and weights up to floating-point rounding; weights are updated in float32 (float64
weights in float64).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Mapping

import torch

from ..errors import UsageError
from ..guards import NumericalError, NumericalWarning
from ..patterns import NM, Pattern, select

_SOLVE_ELEMENTS = 1 << 25  # rows of a batched solve are chunked to about this many matrix entries
SOLVERS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class SparseGPT:
    name = "sparsegpt"
    needs = ("hessian",)
    default_scope = "matrix"  # of each column block, as in the paper
    blocksize: int = 128
    damp: float = 0.01
    solver: str = "auto"  # "auto" | "triton" | "torch": how a block is solved (same result up to rounding)

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise UsageError(f"SparseGPT.solver must be one of {', '.join(SOLVERS)}, got {self.solver!r}")

    def settings(self) -> dict:
        return {"blocksize": self.blocksize, "damp": self.damp}

    def prune(
        self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w = weight.to(torch.promote_types(weight.dtype, torch.float32)).clone()
        hinv, dead = inverse_cholesky(stats["hessian"], self.damp)
        hinv = hinv.to(w.dtype)
        w[:, dead] = 0.0
        keep = torch.ones_like(w, dtype=torch.bool)
        solve = block_solver(self.solver, w)
        bs = block_width(self.blocksize, pattern)
        for i1 in range(0, w.shape[1], bs):
            i2 = min(i1 + bs, w.shape[1])
            u, w1, keep1 = hinv[i1:i2, i1:i2], w[:, i1:i2], keep[:, i1:i2]
            if not isinstance(pattern, NM):
                keep1.copy_(select(w1.pow(2) / u.diagonal().pow(2).unsqueeze(0), pattern, self.default_scope))
            err = solve(w1, keep1, u, pattern)
            w[:, i2:] -= err @ hinv[i1:i2, i2:]
        return w.to(weight.dtype), keep


def block_width(blocksize: int, pattern: Pattern) -> int:
    """``blocksize``, rounded down to a multiple of M for N:M (at least M)."""
    if isinstance(pattern, NM) and blocksize % pattern.m:
        return pattern.m * max(1, blocksize // pattern.m)
    return blocksize


def block_solver(solver: str, w: torch.Tensor):
    """The function that prunes one block in place: ``(w1, keep1, u, pattern) -> errors``."""
    if solver == "torch" or (solver == "auto" and not (w.is_cuda and triton_kernel() is not None)):
        return prune_block
    kernel = triton_kernel()
    if kernel is None:
        raise UsageError("SparseGPT.solver='triton' needs the triton package (it comes with CUDA builds of torch)")
    return kernel.prune_block


def triton_kernel():
    """The Triton block kernel module, or None where triton does not import."""
    try:
        from . import sparsegpt_kernel
    except ImportError:
        return None
    return sparsegpt_kernel


def prune_block(w1: torch.Tensor, keep1: torch.Tensor, u: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Torch solver of one block, in place: N:M masks chosen per group of M columns (written to
    ``keep1``), an unstructured mask read from ``keep1``; returns the errors of the pruned columns."""
    err = torch.empty_like(w1)
    width = w1.shape[1]
    step = pattern.m if isinstance(pattern, NM) else width
    for a in range(0, width, step):
        b = a + step
        sub, u_sub = w1[:, a:b], u[a:b, a:b]
        if isinstance(pattern, NM):  # chosen from the weights as updated by all earlier columns
            keep1[:, a:b] = select(sub.pow(2) / u_sub.diagonal().pow(2).unsqueeze(0), pattern)
        e = pruned_errors(sub, ~keep1[:, a:b], u_sub)
        err[:, a:b] = e
        sub.sub_(e @ u_sub).mul_(keep1[:, a:b])
        if b < width:
            w1[:, b:] -= e @ u[a:b, b:]
    return err


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
                upper = upper.contiguous()  # row-major: the block kernel reads rows of it
                note = None
                if attempt:
                    note = f"Hessian not positive definite with dampening {damp:g}; factorised with {used:g}"
                return upper, dead, note
    raise NumericalError(
        f"the Hessian cannot be factorised even with dampening {used:g} (tried {damp:g} x 10^0..{DAMP_RETRIES}); "
        "use more calibration data (--nsamples, --seqlen) or --dtype float32"
    )
