"""Importance of whole input channels of a consuming Linear (down_proj, o_proj), and of decoder blocks.

Structured pruning removes an MLP channel (a row of gate/up, the matching column of down_proj) or an
attention head (its rows of q/k/v, its columns of o_proj) as a unit, so every score here is one number
per input column of the consuming weight W [out, in], computed from W and that column's calibration
statistics. These are pure functions: the runner collects the statistics, ``surgery`` removes.

- ``wanda-sp`` (the Wanda paper's structured variant; FLAP's baseline): mean over output rows of
  |W_ij| * ||X_j||, i.e. ||X_j|| times the mean |W| of column j (FLAP's code, ``prune_wanda_sp``).
- ``flap`` (FLAP's WIFV, An et al. 2024): Var(X_j) over calibration tokens times ||W_:j||^2, the
  fluctuation of the channel's contribution; its bias compensation is ``compensation_bias``.
- ``magnitude``: ||W_:j||_2, no calibration (FLAP's ``prune_magnitude_sp``).

A head's score is the sum of its channels' scores and a KV group's the sum of its query heads'.
FLAP's code squares its attention channel scores before summing them per head; ``head_power`` = 2
does the same for ``flap``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ..stats import feature_variance


def wanda_sp(weight: torch.Tensor, stats: Mapping[str, object]) -> torch.Tensor:
    """Mean over output rows of |W_ij| * sqrt(mean of x_j^2): one score per input column."""
    return (weight.abs().float() * stats["norms"].mean_sq.sqrt().unsqueeze(0)).mean(dim=0)


def fluctuation(weight: torch.Tensor, stats: Mapping[str, object]) -> torch.Tensor:
    """FLAP's WIFV: Var(x_j) over calibration tokens times the squared norm of column j."""
    return feature_variance(stats["norms"], stats["means"]) * weight.float().square().sum(dim=0)


def magnitude(weight: torch.Tensor, stats: Mapping[str, object]) -> torch.Tensor:
    """The L2 norm of each input column."""
    return weight.float().norm(dim=0)


@dataclass(frozen=True)
class Importance:
    """A channel score, the statistics it needs of the consuming Linear's input, how heads add it up."""

    name: str
    score: Callable[[torch.Tensor, Mapping[str, object]], torch.Tensor]
    needs: tuple[str, ...]
    head_power: float = 1.0
    """Channel scores are raised to this power before they are summed per head (FLAP's code: 2)."""


IMPORTANCE = {
    "wanda-sp": Importance("wanda-sp", wanda_sp, ("norms",)),
    "flap": Importance("flap", fluctuation, ("norms", "means"), head_power=2.0),
    "magnitude": Importance("magnitude", magnitude, ()),
}


def group_scores(channel_scores: torch.Tensor, groups: int, power: float = 1.0) -> torch.Tensor:
    """One score per group of consecutive channels (a KV group's query heads): the sum of ``score ** power``."""
    return channel_scores.double().pow(power).reshape(groups, -1).sum(dim=1)


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` highest scores; ties keep the earlier index."""
    if not 0 <= keep <= scores.numel():
        raise ValueError(f"cannot keep {keep} of {scores.numel()}")
    order = torch.sort(-scores.double(), stable=True).indices
    return order[:keep].sort().values


def compensation_bias(weight: torch.Tensor, mean: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: the removed columns' output at the mean input, W[:, removed] @ E[x_removed]."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[kept] = False
    return weight.float()[:, removed] @ mean.float().to(weight.device)[removed]


def cosine_sum(x_in: torch.Tensor, x_out: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of cos(x_in, x_out), tokens): ShortGPT's block importance is 1 - their mean."""
    a = x_in.reshape(-1, x_in.shape[-1]).float()
    b = x_out.reshape(-1, x_out.shape[-1]).float()
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
    return float(cos.double().sum()), a.shape[0]
