"""RIA (Zhang et al. 2024): relative importance times input activation norm.

score_ij = (|W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|) * ||X_j||_2 ** a. Unstructured, the scores are
compared across the whole matrix, one threshold per weight as in the RIA code (its ``--per_outneuron``, Wanda's
per-row comparison, is off by default; ``Unstructured(s, scope="row")`` or ``--scope row`` chooses it); with
``permute`` an N:M mask is chosen on input channels reordered by ``permute.nm_permutation`` and mapped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import ScoreMethod


@dataclass(frozen=True)
class RIA(ScoreMethod):
    name = "ria"
    needs = ("norms",)
    default_scope = "matrix"
    a: float = 0.5
    permute: bool = False

    def score(self, weight, stats) -> torch.Tensor:
        w = weight.abs().float()
        tiny = torch.finfo(torch.float32).tiny
        relative = w / w.sum(dim=1, keepdim=True).clamp_min(tiny) + w / w.sum(dim=0, keepdim=True).clamp_min(tiny)
        return relative * stats["norms"].sum_sq.sqrt().pow(self.a).unsqueeze(0)

    def settings(self) -> dict:
        return {"default_scope": self.default_scope, "a": self.a, "permute": self.permute}
