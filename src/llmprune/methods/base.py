"""What a pruning method is: weight + declared statistics + pattern -> (new weight, keep-mask)."""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ..patterns import NM, Pattern, Scope, select


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
