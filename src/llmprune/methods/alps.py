"""ALPS (Meng, Behdin, Wang, Mazumder 2024): layer-wise pruning by ADMM, then conjugate gradients on the support.

For a Linear with weight W0 [out, in] and H = X^T X over the calibration inputs, ALPS minimises the output
error (W - W0) H (W - W0)^T subject to W's sparsity pattern:

1. Condition: H + d I with d = ``damp`` times the mean of diag(H), then scale to unit diagonal:
   Hn = S^-1 (H + d I) S^-1 with S = sqrt(diag(H + d I)), and B0 = W0 S (the problem is the same in B = W S).
2. ADMM on B (free) and D (in the pattern), with scaled duals V and penalty rho:
       B <- (B0 Hn - V + rho D) (Hn + rho I)^-1
       D <- the pattern's projection of B + V / rho (keep the largest squares)
       V <- V + rho (B - D)
   (Hn + rho I)^-1 comes from one eigendecomposition of Hn. Every ``update_iter`` steps rho grows with
   the share of the support that changed (x1.3 above 10%, x1.2 above 0.5%, x1.1 for any change); a
   support that settles before rho has grown means rho was too large: it is divided by 5 (and, if the
   support still moved, the iterates restart). The loop ends when the support no longer changes, or
   after ``switch_iter`` steps once less than 0.03% of it changes, or after ``max_iter`` steps.
3. B projected onto the pattern, then ``cg_iters`` conjugate-gradient steps on Hn B = B0 Hn restricted to
   that support (diag(Hn) = 1, so this is CG with the Jacobi preconditioner on the original system).
4. W = B S^-1.

Defaults are the paper's (its code): rho 0.1, at most 300 steps, rho updated every 3, 10 CG steps,
dampening 1% of the mean diagonal. Unstructured sparsity is chosen over the whole matrix (``Unstructured``
with scope "row" chooses per output row); N:M in groups of M consecutive inputs of each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from ..patterns import NM, Pattern, Scope, select
from .base import Pruned


@dataclass(frozen=True)
class ALPS:
    name: ClassVar[str] = "alps"
    needs: ClassVar[tuple[str, ...]] = ("hessian",)
    default_scope: ClassVar[Scope] = "matrix"
    work_bytes: ClassVar[tuple[int, int]] = (40, 40)
    """B, D, V, the target, CG's residual and direction and temporaries per weight entry; Hn, its eigenvectors
    (fp64), the inverse and the fp64 conditioning per [cols, cols] entry (``memory.WORK_BYTES``)."""
    rho: float = 0.1
    max_iter: int = 300
    update_iter: int = 3
    switch_iter: int = 30
    cg_iters: int = 10
    damp: float = 0.01
    permute: bool = False
    """N:M only (``--permute``, not in the paper): the groups of M are taken in an input order chosen once from
    |B0| = |W0| S (``permute.nm_permutation``), so the projection keeps more of B; ADMM and CG are unchanged."""

    def prune(self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern):
        pruned = self.prune_ordered(weight, stats, pattern)
        return pruned.weight, pruned.keep

    def prune_ordered(self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern) -> Pruned:
        hn, scale, vals, vecs = conditioned(stats["hessian"], self.damp)
        w0 = weight.to(torch.float32) * scale.unsqueeze(0)  # B0
        perm = None
        if self.permute and isinstance(pattern, NM):
            from ..permute import nm_permutation

            perm = nm_permutation(w0.abs(), pattern).to(w0.device)
        target = w0 @ hn  # B0 Hn
        b, keep = self.admm(w0, target, vals, vecs, pattern, perm)
        b = support_cg(hn, target, b, keep, self.cg_iters)
        return Pruned((b / scale.unsqueeze(0)).to(weight.dtype), keep, perm)

    def project(self, b: torch.Tensor, pattern: Pattern, perm: torch.Tensor | None = None):
        """(B on the pattern, its mask): the largest squares kept; N:M groups in ``perm``'s order where given."""
        if perm is None:
            keep = select(b.pow(2), pattern, self.default_scope)
        else:
            keep = torch.empty_like(b, dtype=torch.bool)
            keep[:, perm] = select(b[:, perm].pow(2), pattern)
        return b * keep, keep

    def admm(self, b0, target, vals, vecs, pattern, perm=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ADMM iterations (module docstring, step 2); the final iterate projected, and its mask."""
        rho, grown = self.rho, False
        d0, keep = self.project(b0, pattern, perm)
        b, d, v = b0, d0, torch.zeros_like(b0)
        kept = int(keep.sum())
        inv = inverse_plus(vals, vecs, rho)
        previous = keep
        for step in range(self.max_iter):
            b = (target - v + rho * d) @ inv
            d, keep = self.project(b + v / rho, pattern, perm)
            v = v + rho * (b - d)
            if (step + 1) % self.update_iter:
                continue
            changed = int((keep != previous).sum())
            previous = keep
            rho, grown, restart, stop = next_rho(rho, grown, changed / max(kept, 1), changed)
            if stop:
                break
            if restart:
                b, d, v = b0, d0, torch.zeros_like(b0)
            inv = inverse_plus(vals, vecs, rho)
            if step >= self.switch_iter and changed / max(kept, 1) < 3e-4:
                break
        return self.project(b, pattern, perm)

    def settings(self) -> dict:
        return {"default_scope": self.default_scope, "rho": self.rho, "max_iter": self.max_iter,
                "update_iter": self.update_iter, "switch_iter": self.switch_iter, "cg_iters": self.cg_iters,
                "damp": self.damp, "permute": self.permute}


def next_rho(rho: float, grown: bool, share: float, changed: int) -> tuple[float, bool, bool, bool]:
    """(rho, whether it has grown yet, restart the iterates, stop) after a support change of ``changed``
    positions, ``share`` of the kept count."""
    restart = stop = False
    if share > 0.1:
        rho, grown = rho * 1.3, True
    elif share > 0.005:
        rho, grown = rho * 1.2, True
    elif changed > 0:
        if grown:
            rho *= 1.1
        else:
            rho, restart = rho / 5, True
    elif grown:
        stop = True
    else:
        rho /= 5
    return min(rho, 1e6), grown, restart, stop


def conditioned(hessian, damp: float):
    """(Hn, S, eigenvalues, eigenvectors) of the dampened, unit-diagonal Hessian; computed once per statistic
    (Linears that read the same input share it)."""
    key = ("alps", damp)
    if key not in hessian.memo:
        h = hessian.matrix.to(torch.float64)
        h = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        scale = h.diagonal().sqrt() + 1e-8
        hn = h / scale.unsqueeze(0) / scale.unsqueeze(1)
        vals, vecs = torch.linalg.eigh(hn)
        hessian.memo[key] = (hn.float(), scale.float(), vals, vecs)
    return hessian.memo[key]


def inverse_plus(vals: torch.Tensor, vecs: torch.Tensor, rho: float) -> torch.Tensor:
    """(Hn + rho I)^-1 from Hn's eigendecomposition."""
    return ((vecs / (vals + rho).unsqueeze(0)) @ vecs.T).float()


def support_cg(hn: torch.Tensor, target: torch.Tensor, b: torch.Tensor, keep: torch.Tensor, iters: int) -> torch.Tensor:
    """``iters`` conjugate-gradient steps for each row of B on B Hn = target, with B's zeros outside ``keep`` fixed
    (every row is its own system; an exact line search per row, so the objective only goes down)."""
    mask = keep.to(b.dtype)
    r = (target - b @ hn) * mask
    p = r.clone()
    rr = (r * r).sum(dim=1, keepdim=True)
    for _ in range(iters):
        hp = (p @ hn) * mask
        php = (p * hp).sum(dim=1, keepdim=True)
        alpha = torch.where(php > 0, rr / php.clamp_min(1e-30), torch.zeros_like(php))
        b = b + alpha * p
        r = r - alpha * hp
        rr_new = (r * r).sum(dim=1, keepdim=True)
        beta = torch.where(rr > 0, rr_new / rr.clamp_min(1e-30), torch.zeros_like(rr))
        p = r + beta * p
        rr = rr_new
    return b * mask
