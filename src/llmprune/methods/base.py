"""What a pruning method is: weight + declared statistics + pattern -> (new weight, keep-mask)."""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch

from ..patterns import Pattern, Scope, select


class ScoreMethod:
    """A method defined by an importance score; the shared ``select`` makes the mask.

    Subclasses set ``name``, ``needs`` (statistics names, see ``stats.STATISTICS``) and
    ``default_scope``, and implement ``score``. Weights are never updated, only masked.
    """

    name: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    default_scope: ClassVar[Scope] = "row"

    def score(self, weight: torch.Tensor, stats: Mapping[str, object]) -> torch.Tensor:
        raise NotImplementedError

    def prune(
        self, weight: torch.Tensor, stats: Mapping[str, object], pattern: Pattern
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keep = select(self.score(weight, stats), pattern, self.default_scope)
        return weight * keep, keep

    def settings(self) -> dict:
        return {"default_scope": self.default_scope}
