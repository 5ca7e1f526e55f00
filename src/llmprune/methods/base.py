"""What a pruning method is: weight + declared statistics + pattern -> (new weight, keep-mask)."""

from __future__ import annotations

from typing import ClassVar, Mapping, Protocol, runtime_checkable

import torch

from ..patterns import NM, Pattern, Scope, select


Stats = Mapping[str, object]
"""A Linear's statistics by name (``stats.STATISTICS``: norms, means, hessian), as a method declared it needs."""


@runtime_checkable
class Method(Protocol):
    """What the runner calls: a pure function of a weight, its statistics and the pattern."""

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

    def mask(self, scores: torch.Tensor, pattern: Pattern) -> torch.Tensor:
        if isinstance(pattern, NM) and getattr(self, "permute", False):
            from ..permute import permuted_nm_select

            return permuted_nm_select(scores, pattern)
        return select(scores, pattern, self.default_scope)

    def prune(
        self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.mask(self.score(weight, stats), pattern)
        return weight * keep, keep

    def settings(self) -> dict:
        out = {"default_scope": self.default_scope}
        if hasattr(self, "permute"):
            out["permute"] = self.permute
        return out
