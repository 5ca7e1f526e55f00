"""What a pruning method is: weight + declared statistics + pattern -> (new weight, keep-mask)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping, Protocol, runtime_checkable

import torch

from ..patterns import NM, Pattern, Scope, select


Stats = Mapping[str, object]
"""A Linear's statistics by name (``stats.STATISTICS``: norms, means, hessian), as a method declared it needs."""


@dataclass(frozen=True)
class Pruned:
    """One pruned weight: the new weight, its keep-mask, and the input-column order the mask is N:M in."""

    weight: torch.Tensor
    keep: torch.Tensor
    perm: torch.Tensor | None = None
    """Position p holds input column ``perm[p]``: ``keep[:, perm]`` is N:M (``--permute``); None: the stored order."""


@runtime_checkable
class Method(Protocol):
    """What the runner calls: a pure function of a weight, its statistics and the pattern.

    A method that chooses its mask on permuted input columns also has ``prune_ordered(weight, stats, pattern)
    -> Pruned``, which gives that order too (see ``prune_layer``)."""

    name: str
    needs: tuple[str, ...]
    """Statistics the runner must collect for it (empty: no calibration forward at all)."""

    def prune(self, weight: torch.Tensor, stats: Stats, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
        """(new weight, keep-mask); pruned entries of the new weight are zeros."""
        ...

    def settings(self) -> dict:
        """What the report records of its options."""
        ...


@runtime_checkable
class Modifier(Protocol):
    """An options object that turns a method into another (``methods.MODIFIERS``)."""

    kind: str
    """permute | refine | update: the flag that names it, and when it applies (``methods.MODIFIER_ORDER``)."""

    def apply(self, method: Method) -> Method:
        """The modified method; a ``UsageError`` naming the flag when it does not fit ``method``."""
        ...


def prune_layer(method: Method, weight: torch.Tensor, stats: Stats, pattern: Pattern) -> Pruned:
    """``method`` applied to one weight, with the column order of its mask where it has ``prune_ordered``."""
    ordered = getattr(method, "prune_ordered", None)
    if ordered is not None:
        return ordered(weight, stats, pattern)
    new_w, keep = method.prune(weight, stats, pattern)
    return Pruned(new_w, keep)


class ScoreMethod:
    """A method defined by an importance score; the shared ``select`` makes the mask.

    Subclasses set ``name``, ``needs`` (statistics names, see ``stats.STATISTICS``) and
    ``default_scope``, and implement ``score``. Weights are never updated, only masked.
    A subclass with a ``permute`` field set chooses N:M masks on permuted input channels.
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    default_scope: ClassVar[Scope] = "row"

    def score(self, weight: torch.Tensor, stats: Mapping[str, object]) -> torch.Tensor:
        raise NotImplementedError

    def permutes(self, pattern: Pattern) -> bool:
        """Whether the mask for ``pattern`` is chosen on permuted input columns."""
        return isinstance(pattern, NM) and getattr(self, "permute", False)

    def mask(self, scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
        if self.permutes(pattern):
            from ..permute import permuted_nm_select

            return permuted_nm_select(scores, pattern)
        return select(scores, pattern, self.default_scope)

    def prune_ordered(self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern) -> Pruned:
        scores = self.score(weight, stats)
        if self.permutes(pattern):
            from ..permute import permuted_nm_mask

            keep, perm = permuted_nm_mask(scores, pattern)
        else:
            keep, perm = self.mask(scores, pattern), None
        return Pruned(weight * keep, keep, perm)

    def prune(
        self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pruned = self.prune_ordered(weight, stats, pattern)
        return pruned.weight, pruned.keep

    def settings(self) -> dict:
        out = {"default_scope": self.default_scope}
        if hasattr(self, "permute"):
            out["permute"] = self.permute
        return out
