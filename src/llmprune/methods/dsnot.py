"""DSnoT (Zhang et al. 2024, "Dynamic Sparse No Training"): refine a score method's keep-mask, weights untouched.

For output row i with pruned set P, the reconstruction error is
    eps_i = sum_{j in P} W_ij S_j
(the dense minus the sparse output). Each cycle, every row with |eps| above ``threshold`` makes one swap:
- grow: the pruned weight with the largest sign(eps) W_ij S_j / Var(x_j): it takes back error of eps's sign,
  and the variance favours features whose mean speaks for every token;
- prune (unstructured): among the kept weights whose W_ij S_j has the sign opposite to eps (removing them also
  moves eps toward zero), the least important by Wanda's |W_ij| ||x_j||.
Two variants (``DSnoT.variant``) differ in the rest:
- "paper", as the DSnoT code runs by default: S_j is the sum of x_j over a calibration window's tokens,
  averaged over the windows, so ``threshold`` 0.1 is the paper's; an unstructured swap needs only
  |eps| > threshold (the code's default ``--without_same_sign``), even one that overshoots past zero; for N:M the
  weight pruned is the one of least base-method score among the kept weights of the grown weight's group of M,
  whatever its sign, and a swap is made only if eps keeps the sign it started with.
- "llmprune": S_j = E[x_j], the mean per token (the threshold is per token, looser by the window length);
  N:M prunes as unstructured does, within the grown weight's group; a swap is made only if it lowers |eps|, so
  no row's |eps| grows.
Either way a row stops at its first swap refused, once |eps| <= threshold, after ``cycles`` swaps, or when it
has no candidate left (where the DSnoT code goes on with other weights). So each row keeps its number of weights
(each group its N), and a weight moves at most once: grown weights were pruned by the method, pruned ones were
kept by it. All rows of a weight advance together; the only loop is over cycles. (The DSnoT code by default
refines only the attention Linears, ``--skip_layer mlp``; here every Linear is refined.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Mapping

import torch

from ..errors import UsageError
from ..patterns import NM, Pattern
from ..stats import feature_variance
from .base import Pruned, prune_layer

_TINY_VAR = 1e-12  # a constant input feature is grown first, not divided by zero
VARIANTS = ("paper", "llmprune")
"""``DSnoT.variant``: the DSnoT code's scale and rules, or this library's earlier ones (module docstring)."""


def refine_mask(weight: torch.Tensor, keep: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                mean_sq: torch.Tensor, pattern: Pattern, cycles: int = 50, threshold: float = 0.1,
                variant: str = "paper", base_score: torch.Tensor | None = None) -> torch.Tensor:
    """The refined keep-mask (see the module docstring); ``mean`` (S_j: per window for "paper", per token for
    "llmprune"), ``var`` and ``mean_sq`` are per input feature; ``base_score``: the scoring method's scores, by which
    "paper" prunes N:M groups (None: Wanda's)."""
    w = weight.float()
    share = w * mean.float().unsqueeze(0)  # each weight's part of the expected output
    importance = w.abs() * mean_sq.float().sqrt().unsqueeze(0)
    growth = share / var.float().clamp_min(_TINY_VAR).unsqueeze(0)
    kept0 = keep.bool()
    pruned0 = ~kept0
    eps = (share * pruned0).sum(dim=1, dtype=torch.float64)
    sign0 = torch.sign(eps)
    k = min(cycles, w.shape[1])
    inf = float("inf")
    # candidates in the order they would be used, for eps > 0 ("up") and eps < 0 ("down")
    grow = (_ranked(torch.where(pruned0 & (share > 0), growth, -inf), k, largest=True),
            _ranked(torch.where(pruned0 & (share < 0), growth, inf), k, largest=False))
    choose = _pruning_rule(share, importance, kept0, pattern, k, variant, base_score)
    rows = torch.arange(w.shape[0], device=w.device)
    used = torch.zeros(4, w.shape[0], dtype=torch.long, device=w.device)  # grow up/down, prune up/down
    active = torch.ones(w.shape[0], dtype=torch.bool, device=w.device)
    keep = kept0.clone()
    for _ in range(cycles):
        up = eps > 0
        g, g_ok = _next(up, grow, used[0], used[1])
        p, p_ok = choose(up, g, keep, used)
        after = eps + share[rows, p].double() - share[rows, g].double()
        swap = active & g_ok & p_ok & (eps.abs() > threshold) & _accepted(eps, after, sign0, pattern, variant)
        if not bool(swap.any()):
            break
        keep[rows[swap], g[swap]] = True
        keep[rows[swap], p[swap]] = False
        eps = torch.where(swap, after, eps)
        used += torch.stack([swap & up, swap & ~up, swap & up, swap & ~up]).long()
        active = swap
    return keep


def _pruning_rule(share, importance, kept0, pattern: Pattern, k: int, variant: str, base_score):
    """``choose(up, grown, keep, used) -> (column to prune, whether there is one)`` per row, by the variant's rule."""
    inf = float("inf")
    if isinstance(pattern, NM) and variant == "paper":
        score = (importance if base_score is None else base_score.float()).to(share.device)
        return lambda up, g, keep, used: _least_in_group(g, keep & kept0, score, pattern.m)
    if isinstance(pattern, NM):
        negative, positive = kept0 & (share < 0), kept0 & (share > 0)

        def in_group(up, g, keep, used):
            opposite = torch.where(up.unsqueeze(1), negative, positive)
            return _least_in_group(g, keep & opposite, importance, pattern.m)

        return in_group
    prune = (_ranked(torch.where(kept0 & (share < 0), importance, inf), k, largest=False),
             _ranked(torch.where(kept0 & (share > 0), importance, inf), k, largest=False))
    return lambda up, g, keep, used: _next(up, prune, used[2], used[3])


def _accepted(eps: torch.Tensor, after: torch.Tensor, sign0: torch.Tensor, pattern: Pattern, variant: str):
    """Whether each row's swap may be made: "llmprune" when |eps| falls; "paper" N:M when eps keeps its first sign,
    "paper" unstructured always (the threshold alone decides)."""
    if variant == "llmprune":
        return after.abs() < eps.abs()
    if isinstance(pattern, NM):
        return torch.sign(after) == sign0
    return torch.ones_like(eps, dtype=torch.bool)


def _ranked(values: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the column indices of the ``k`` best finite values in order, and which of them exist."""
    best, idx = torch.topk(values, k, dim=1, largest=largest, sorted=True)
    return idx, torch.isfinite(best)


def _next(up: torch.Tensor, lists, used_up: torch.Tensor, used_down: torch.Tensor):
    """Each row's next unused candidate from the up or the down list, and whether there is one."""
    (idx_u, ok_u), (idx_d, ok_d) = lists
    k = idx_u.shape[1]
    at_u, at_d = used_up.clamp(max=k - 1).unsqueeze(1), used_down.clamp(max=k - 1).unsqueeze(1)
    idx = torch.where(up, idx_u.gather(1, at_u).squeeze(1), idx_d.gather(1, at_d).squeeze(1))
    ok = torch.where(up, ok_u.gather(1, at_u).squeeze(1) & (used_up < k), ok_d.gather(1, at_d).squeeze(1) & (used_down < k))
    return idx, ok


def _least_in_group(col: torch.Tensor, prunable: torch.Tensor, importance: torch.Tensor, m: int):
    """Per row, the least important prunable weight in the group of M that holds column ``col``."""
    start = col - col % m
    cols = start.unsqueeze(1) + torch.arange(m, device=col.device)
    scores = torch.where(prunable.gather(1, cols), importance.gather(1, cols), float("inf"))
    best, j = scores.min(dim=1)
    return start + j, torch.isfinite(best)


@dataclass(frozen=True)
class DSnoT:
    """The modifier ``--refine dsnot``: after the scoring method's mask, per row, swap a pruned weight in and a
    kept weight out while the variant's rules allow (``refine_mask``)."""

    kind: ClassVar[str] = "refine"

    cycles: int = 50
    """At most this many swaps per output row."""
    threshold: float = 0.1
    """A row stops once |eps| is at or below this (eps per calibration window for "paper", per token for "llmprune")."""
    variant: str = "paper"
    """paper (the DSnoT code's error scale and swap rules) | llmprune (per-token error; a swap must lower |eps|)."""

    def __post_init__(self) -> None:
        if isinstance(self.cycles, bool) or not isinstance(self.cycles, int) or self.cycles < 1:
            raise UsageError(f"--dsnot-cycles must be a positive integer, got {self.cycles!r}; e.g. --dsnot-cycles 50")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not math.isfinite(self.threshold) or self.threshold < 0:
            raise UsageError(f"--dsnot-threshold must be a finite number >= 0, got {self.threshold!r}; "
                             "e.g. --dsnot-threshold 0.1")
        if self.variant not in VARIANTS:
            raise UsageError(f"--dsnot-variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}; "
                             "e.g. --dsnot-variant paper")

    def apply(self, method):
        """``method`` with its mask refined; score methods only (a method that updates weights has no fixed mask)."""
        if isinstance(method, WithDSnoT):
            return method
        if not hasattr(method, "score"):
            from . import score_method_names

            raise UsageError(f"--refine dsnot refines the mask of a score method ({', '.join(score_method_names())}); "
                             f"{method.name} changes the weights as it masks: drop --refine")
        return WithDSnoT(method, self.cycles, self.threshold, self.variant)


@dataclass(frozen=True)
class WithDSnoT:
    """A score method's mask refined by ``refine_mask`` (needs input norms and means besides its own statistics).

    With ``permute`` (N:M), the refinement runs in the permuted column order, where the groups of M are."""

    method: object
    cycles: int = 50
    threshold: float = 0.1
    variant: str = "paper"
    name: str = field(init=False)
    needs: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", f"{self.method.name}+dsnot")
        object.__setattr__(self, "needs", tuple(dict.fromkeys((*self.method.needs, "norms", "means"))))

    def prune_ordered(self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern) -> Pruned:
        means, mean_sq = stats["means"], stats["norms"].mean_sq
        mean = means.per_window if self.variant == "paper" else means.mean
        var = feature_variance(stats["norms"], means)
        by_score = self.variant == "paper" and isinstance(pattern, NM)  # paper N:M prunes by the method's score

        def refine(w, chosen, order, score):
            return refine_mask(w, chosen, mean[order], var[order], mean_sq[order], pattern, self.cycles,
                               self.threshold, self.variant, score if by_score else None)

        perm = None
        if isinstance(pattern, NM) and getattr(self.method, "permute", False):
            from ..permute import permuted_nm_mask

            score = self.method.score(weight, stats)
            keep, perm = permuted_nm_mask(score, pattern,
                                          then=lambda chosen, perm: refine(weight[:, perm], chosen, perm, score[:, perm]))
        else:
            keep = prune_layer(self.method, weight, stats, pattern).keep
            score = self.method.score(weight, stats) if by_score else None
            keep = refine(weight, keep, slice(None), score)
        return Pruned(weight * keep, keep, perm)

    def prune(self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern):
        pruned = self.prune_ordered(weight, stats, pattern)
        return pruned.weight, pruned.keep

    def settings(self) -> dict:
        return {**self.method.settings(), "refine": "dsnot", "dsnot_cycles": self.cycles,
                "dsnot_threshold": self.threshold, "dsnot_variant": self.variant}
