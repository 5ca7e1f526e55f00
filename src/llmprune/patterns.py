"""Sparsity patterns and the one shared step that turns scores into a keep-mask.

Convention: ``keep_mask`` is True where a weight is kept. N:M means at most N
non-zeros in every M consecutive weights along the input dimension (the last
dimension of a ``[out_features, in_features]`` weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch

from .errors import UsageError

Scope = Literal["row", "matrix"]


@dataclass(frozen=True)
class Unstructured:
    """Prune ``sparsity`` of the weights, compared within each row or across the matrix.

    ``scope=None`` means "the method's own default" (row for Wanda, matrix for magnitude and RIA).
    """

    sparsity: float
    scope: Scope | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise UsageError(f"--sparsity must be a fraction in [0, 1), got {self.sparsity!r}; e.g. --sparsity 0.5")
        if self.scope not in (None, "row", "matrix"):
            raise UsageError(f"--scope must be row or matrix, got {self.scope!r}; e.g. --scope matrix")

    @property
    def target(self) -> float:
        return float(self.sparsity)

    def __str__(self) -> str:
        return "unstructured"


@dataclass(frozen=True)
class NM:
    """At most ``n`` non-zeros in every ``m`` consecutive input weights."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.m < 1 or not 0 < self.n <= self.m:
            raise UsageError(f"--pattern N:M needs integers 0 < N <= M, got {self.n}:{self.m}; e.g. --pattern 2:4")

    @property
    def target(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


Pattern = Union[Unstructured, NM]


def parse_pattern(text: str, sparsity: float | None = None, scope: str | None = None) -> Pattern:
    """Parse ``"unstructured"`` (needs ``sparsity``; ``scope`` row | matrix | None for the method's default) or
    ``"N:M"`` (no ``scope``: every group of M is its own comparison) once, at the edge."""
    text = str(text).strip().lower()
    if isinstance(scope, str):
        scope = scope.strip().lower() or None
    if text == "unstructured":
        if sparsity is None:
            raise UsageError("--pattern unstructured needs --sparsity, e.g. --sparsity 0.5")
        return Unstructured(float(sparsity), scope)
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise UsageError(f"--pattern must be 'unstructured' or N:M such as 2:4, got {text!r}")
    if scope is not None:
        raise UsageError(f"--scope applies to unstructured sparsity; drop --scope with --pattern {text}")
    return NM(int(parts[0]), int(parts[1]))


def check_fits(pattern: Pattern, in_features: int, name: str) -> None:
    """Refuse an N:M pattern whose M does not divide a layer's input width."""
    if isinstance(pattern, NM) and in_features % pattern.m:
        raise UsageError(
            f"--pattern {pattern}: M={pattern.m} does not divide the input width {in_features} of {name}; "
            f"choose an M that divides {in_features}"
        )


def select(scores: torch.Tensor, pattern: Pattern, scope: Scope = "row") -> torch.Tensor:
    """Keep-mask of the same shape as ``scores``: the highest scores survive.

    ``scope`` applies to unstructured patterns only; an ``Unstructured.scope`` set by the
    user wins over the method's default passed here. Exact counts: ``int(n * sparsity)``
    weights are pruned per comparison group (``m - n`` per N:M group). Ties are broken by
    position, the same way on every device: among equal scores the earlier one is pruned.
    """
    if isinstance(pattern, NM):
        return _select_nm(scores, pattern)
    scope = pattern.scope or scope
    if scope == "row":
        return _prune_lowest(scores, int(scores.shape[1] * pattern.sparsity))
    flat = _prune_lowest(scores.reshape(1, -1), int(scores.numel() * pattern.sparsity))
    return flat.reshape(scores.shape)


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per row of a 2-D tensor, mark the ``k`` lowest scores as pruned (False); a stable sort breaks ties."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k > 0:
        idx = torch.sort(scores, dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, idx, False)
    return keep


# Largest M for which a GPU chooses N:M masks by pairwise ranks (M * M comparisons per group) instead of a sort
RANK_MAX_M = 8


def _select_nm(scores: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Every M consecutive scores of a row are one group of ``_prune_lowest``.

    On a GPU, for small M, the same mask comes from each score's rank in a stable ascending order of its group,
    counted by comparisons (``nm_ranks``): a sort over millions of groups of 4 there costs several times the
    elementwise comparisons. On a CPU the sort is the faster of the two. Both give the same mask, bit for bit.
    """
    groups = scores.reshape(-1, pattern.m)
    k = pattern.m - pattern.n
    if groups.is_cuda and pattern.m <= RANK_MAX_M:
        return (nm_ranks(groups) >= k).reshape(scores.shape)
    return _prune_lowest(groups, k).reshape(scores.shape)


def nm_ranks(groups: torch.Tensor) -> torch.Tensor:
    """Per row of ``groups`` (G, M), each entry's position in a stable ascending sort of its row: the number of
    smaller entries plus the number of equal entries before it. Scores are finite (checked before pruning)."""
    m = groups.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=groups.device).tril(-1)  # [i, j]: j comes before i
    ranks = torch.zeros(groups.shape, dtype=torch.uint8, device=groups.device)
    for j in range(m):
        other = groups[:, j : j + 1]
        ranks += (other < groups) | ((other == groups) & earlier[:, j])
    return ranks
