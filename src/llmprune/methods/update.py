"""A weight update after any mask: per-row least squares of the kept weights on the calibration inputs.

For row w0 of a weight, its kept set S and H = X^T X (up to a constant), the new kept weights minimize
    (w - w0) H (w - w0)^T + d * ||w_S - w0_S||^2,   w = 0 outside S,
i.e. (H_SS + d I) w_S = H_S: w0 + d w0_S, with d = ``damp`` times the mean of diag(H). The dampening
pulls toward the masked weights, not toward zero, so the reconstruction error ||X (w - w0)||^2 can
never exceed the masked weights' own: the masked weights are a feasible point of the same objective.
A row whose result is not finite, or whose error comes out higher in floating point, keeps its masked
weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch

from ..patterns import Pattern
from .base import Pruned, prune_layer


def row_errors(w: torch.Tensor, w0: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-row (w - w0) H (w - w0)^T."""
    d = (w - w0).double()
    return ((d @ h.double()) * d).sum(dim=1)


def lsq_update(weight: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, damp: float = 0.01,
               iters: int = 20) -> torch.Tensor:
    """The kept weights re-fitted row by row (see the module docstring); pruned entries are exact zeros.

    All rows are solved together by conjugate gradients on the masked system (Jacobi preconditioner),
    ``iters`` steps from the masked weights: each step is an exact line search, so the objective only
    goes down, and one step costs one [rows, cols] x [cols, cols] product.
    """
    w0 = weight.float()
    keep_f = keep.to(torch.float32)
    masked = w0 * keep_f
    h = h.float()
    mean_diag = h.diagonal().mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        return masked.to(weight.dtype)
    d = float(damp * mean_diag)
    precond = keep_f / (h.diagonal() + d).unsqueeze(0)
    x = masked.clone()
    r = ((w0 - masked) @ h) * keep_f  # b - A x at x = masked
    z = precond * r
    p = z.clone()
    rz = (r * z).sum(dim=1, keepdim=True)
    for _ in range(iters):
        ap = (p @ h + d * p) * keep_f
        pap = (p * ap).sum(dim=1, keepdim=True)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-30), torch.zeros_like(pap))
        x += alpha * p
        r -= alpha * ap
        z = precond * r
        rz_new = (r * z).sum(dim=1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(1e-30), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    x *= keep_f
    bad = ~torch.isfinite(x).all(dim=1)
    bad |= row_errors(x, w0, h) > row_errors(masked, w0, h)
    x[bad] = masked[bad]
    return x.to(weight.dtype)


def exact_lsq(weight: torch.Tensor, keep: torch.Tensor, h: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """The same fit by one direct solve per row in float64: slow, the reference for tests."""
    w0, h = weight.double(), h.double()
    d = damp * h.diagonal().mean()
    out = torch.zeros_like(w0)
    for i in range(w0.shape[0]):
        s = keep[i].nonzero().squeeze(1)
        a = h[s][:, s] + d * torch.eye(len(s), dtype=torch.float64)
        out[i, s] = torch.linalg.solve(a, h[s] @ w0[i] + d * w0[i, s])
    return out


def lsq_columns(weight: torch.Tensor, kept: torch.Tensor, h: torch.Tensor, damp: float = 0.01,
                cross: torch.Tensor | None = None) -> torch.Tensor:
    """The same fit when every row keeps the same input columns ``kept`` (structured pruning): the re-fitted
    weight on those columns only, [rows, len(kept)].

    With one kept set S the rows share one system, (H_SS + d I) W_S^T = H_S: W0^T + d W0_S^T, solved directly
    (Cholesky, float64) instead of by ``lsq_update``'s conjugate gradients; the objective and the fallback of a
    row that comes out worse than its sliced weights are the same.

    ``cross`` (C = X^T Y, scaled as H, with Y the inputs the layer saw in the dense model, token by token) fits the
    kept columns of the pruned model's inputs X to the dense model's outputs Y W0^T instead of to X W0^T:
    (H_SS + d I) W_S^T = C_S: W0^T + d W0_S^T. Without it C = H, the fit above.
    """
    w0, hd = weight.double(), h.double()
    cd = hd if cross is None else cross.to(hd.device).double()
    sliced = w0[:, kept]
    mean_diag = hd.diagonal().mean()
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        return sliced.to(weight.dtype)
    d = float(damp * mean_diag)
    h_ss = hd[kept][:, kept]
    a = h_ss + d * torch.eye(len(kept), dtype=torch.float64, device=hd.device)
    rhs = cd[kept] @ w0.T + d * sliced.T
    factor, info = torch.linalg.cholesky_ex(a)
    fitted = torch.cholesky_solve(rhs, factor).T if int(info) == 0 else torch.linalg.lstsq(a, rhs).solution.T
    if cross is None:
        full_fit, full_sliced = torch.zeros_like(w0), torch.zeros_like(w0)
        full_fit[:, kept], full_sliced[:, kept] = fitted, sliced
        worse = row_errors(full_fit, w0, hd) > row_errors(full_sliced, w0, hd)
    else:
        target = (cd[kept] @ w0.T).T
        worse = _target_errors(fitted, h_ss, target) > _target_errors(sliced, h_ss, target)
    bad = ~torch.isfinite(fitted).all(dim=1) | worse
    fitted[bad] = sliced[bad]
    return fitted.to(weight.dtype)


def _target_errors(v: torch.Tensor, h_ss: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per row, ||X_S v - Y w0||^2 up to the row's constant: v H_SS v^T - 2 v . (C_S: w0), target = W0 C_S:^T."""
    return ((v @ h_ss) * v).sum(dim=1) - 2 * (v * target).sum(dim=1)


@dataclass(frozen=True)
class WithUpdate:
    """Any method's mask, then ``lsq_update`` of the kept weights (needs the Hessian statistic)."""

    method: object
    damp: float = 0.01
    iters: int = 20
    name: str = field(init=False)
    needs: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", f"{self.method.name}+lsq")
        object.__setattr__(self, "needs", tuple(dict.fromkeys((*self.method.needs, "hessian"))))

    def prune_ordered(self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern) -> Pruned:
        masked = prune_layer(self.method, weight, stats, pattern)  # the fit starts again from the dense weight
        new_w = lsq_update(weight, masked.keep, stats["hessian"].matrix, self.damp, self.iters)
        return Pruned(new_w, masked.keep, masked.perm)

    def prune(self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern):
        pruned = self.prune_ordered(weight, stats, pattern)
        return pruned.weight, pruned.keep

    def settings(self) -> dict:
        return {**self.method.settings(), "update": "lsq", "update_damp": self.damp, "update_iters": self.iters}


@dataclass(frozen=True)
class LeastSquares:
    """The modifier ``--update lsq``: after any method's mask, the kept weights re-fitted by ``lsq_update``."""

    kind: ClassVar[str] = "update"
    damp: float = 0.01
    iters: int = 20

    def apply(self, method):
        return method if isinstance(method, WithUpdate) else WithUpdate(method, self.damp, self.iters)
