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
- ``obs`` (the greedy structured Optimal Brain Surgeon of ZipLM, Kurtic et al. 2023, and SlimGPT, Ling et al.
  2024): not a fixed score but a selection that knows the re-fit. From the damped Hessian H = X^T X + d I of the
  consuming Linear's input, removing the channel group G (one MLP channel, or a KV group's columns) and
  re-fitting the others optimally costs tr(W_:G [H^-1]_GG^-1 W_:G^T), for one column ||W_:j||^2 / [H^-1]_jj.
  The cheapest group goes, W and H^-1 are downdated as if it were re-fitted, and the costs are computed again.
  ``obs_keep`` removes one group per step up to ``OBS_MAX_STEPS`` steps; above that (a 7B MLP) the cheapest
  ceil(removed / OBS_MAX_STEPS) go together in one joint step.

A head's score is the sum of its channels' scores and a KV group's the sum of its query heads'.
FLAP's code squares its attention channel scores before summing them per head; ``head_power`` = 2
does the same for ``flap``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import math

import torch

from ..stats import feature_variance

OBS_MAX_STEPS = 1024
"""``obs``: at most this many downdates of H^-1 per consuming Linear (each one reads and writes all of it)."""


def wanda_sp(weight: torch.Tensor, stats: Mapping[str, object]) -> torch.Tensor:
    """Mean over output rows of |W_ij| * sqrt(mean of x_j^2): one score per input column."""
    return (weight.abs().float() * stats["norms"].mean_sq.sqrt().unsqueeze(0)).mean(dim=0)


def fluctuation(weight: torch.Tensor, stats: Mapping[str, object]) -> torch.Tensor:
    """FLAP's WIFV: Var(x_j) over calibration tokens times the squared norm of column j."""
    return feature_variance(stats["norms"], stats["means"]) * weight.float().square().sum(dim=0)


def magnitude(weight: torch.Tensor, stats: Mapping[str, object]) -> torch.Tensor:
    """The L2 norm of each input column."""
    return weight.float().norm(dim=0)


def obs_keep(weight: torch.Tensor, stats: Mapping[str, object], groups: int, keep: int,
             damp: float = 0.01) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` of ``groups`` equal groups of consecutive input columns that greedy
    structured OBS keeps: the cheapest group to remove with the others re-fitted goes, then the next."""
    w = weight.detach().double().clone()
    h = stats["hessian"].matrix.to(w.device).double()
    size = h.shape[0] // groups
    hinv = _damped_inverse(h, damp)
    alive = torch.ones(groups, dtype=torch.bool, device=w.device)
    left = groups - keep
    per_step = max(1, math.ceil(left / OBS_MAX_STEPS))
    while left > 0:
        cost = _group_costs(w, hinv, alive, size).masked_fill(~alive, math.inf)
        chosen = torch.sort(cost, stable=True).indices[:min(per_step, left)]  # ties: the earlier group goes
        cols = (chosen.unsqueeze(1) * size + torch.arange(size, device=w.device)).reshape(-1)
        _downdate(w, hinv, cols)
        alive[chosen] = False
        left -= chosen.numel()
    return alive.nonzero().flatten()


def _damped_inverse(h: torch.Tensor, damp: float) -> torch.Tensor:
    """(H + damp * mean(diag H) I)^-1; dead inputs (zero diagonal) get the mean's dampening too."""
    mean_diag = h.diagonal().mean()
    scale = float(mean_diag) if torch.isfinite(mean_diag) and mean_diag > 0 else 1.0
    damped = h + max(damp, 1e-8) * scale * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    factor, info = torch.linalg.cholesky_ex(damped)
    return torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.pinv(damped, hermitian=True)


def _group_costs(w: torch.Tensor, hinv: torch.Tensor, alive: torch.Tensor, size: int) -> torch.Tensor:
    """Per live group G: tr(W_:G [H^-1]_GG^-1 W_:G^T), the output error of removing G with the rest re-fitted
    (removed groups' entries are meaningless: the caller masks them)."""
    groups = alive.numel()
    if size == 1:
        return w.square().sum(dim=0) / torch.where(alive, hinv.diagonal(), 1.0)
    blocks = hinv.reshape(groups, size, groups, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    eye = torch.eye(size, dtype=hinv.dtype, device=hinv.device)
    wg = w.T.reshape(groups, size, -1)
    solved = torch.linalg.solve(torch.where(alive[:, None, None], blocks, eye), wg)
    return (wg * solved).sum(dim=(1, 2))


def _downdate(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """In place: the columns ``cols`` of W removed and the others re-fitted (W -= W_:C [H^-1]_CC^-1 [H^-1]_C:),
    and H^-1 made the inverse of the Hessian of the columns left (the same downdate)."""
    block = hinv[cols][:, cols]
    rows = torch.linalg.solve(block, hinv[cols])
    w -= w[:, cols] @ rows
    hinv -= hinv[:, cols] @ rows
    w[:, cols] = 0
    hinv[cols] = 0
    hinv[:, cols] = 0


@dataclass(frozen=True)
class Importance:
    """A channel score, the statistics it needs of the consuming Linear's input, how heads add it up; or, where
    ``select`` is given, a selection of whole groups that replaces the score."""

    name: str
    score: Callable[[torch.Tensor, Mapping[str, object]], torch.Tensor] | None
    needs: tuple[str, ...]
    head_power: float = 1.0
    """Channel scores are raised to this power before they are summed per head (FLAP's code: 2)."""
    select: Callable[..., torch.Tensor] | None = None
    """(weight, stats, groups, keep, damp) -> kept group indices, ascending."""

    def keep(self, weight: torch.Tensor, stats: Mapping[str, object], groups: int, keep: int,
             damp: float) -> torch.Tensor:
        """Indices (ascending) of the ``keep`` of ``groups`` groups of consecutive input columns that stay."""
        if self.select is not None:
            return self.select(weight, stats, groups, keep, damp)
        scores = self.score(weight, stats)
        if groups != scores.numel():
            scores = group_scores(scores, groups, self.head_power)
        return keep_top(scores, keep)


IMPORTANCE = {
    "wanda-sp": Importance("wanda-sp", wanda_sp, ("norms",)),
    "flap": Importance("flap", fluctuation, ("norms", "means"), head_power=2.0),
    "magnitude": Importance("magnitude", magnitude, ()),
    "obs": Importance("obs", None, ("hessian",), select=obs_keep),
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
