"""Input-channel permutation for N:M: reorder columns so more score mass survives the N:M constraint.

The permutation is only used to choose the mask: the mask is selected on the permuted score matrix and
permuted back, so weights stay where they are and the pruned layer computes exactly what the same mask
would compute on the physically permuted layer. The saved weights are therefore N:M only in the
permuted column order, not in the original order (see ``nm_permutation``). ``permuted_nm_mask`` returns
that order with the mask, so the runner can record it per Linear (``runner.LayerResult.perm``) for the
compressed format and the 2:4 kernels.
"""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from .errors import UsageError
from .patterns import NM, select


def retained(scores: torch.Tensor, pattern: NM, perm: torch.Tensor | None = None) -> float:
    """Total score kept by the N:M mask of ``scores`` with columns taken in ``perm`` order."""
    s = scores if perm is None else scores[:, perm]
    return float((s * select(s, pattern)).sum())


def nm_permutation(scores: torch.Tensor, pattern: NM, rounds: int = 1, chunk_elems: int = 1 << 24) -> torch.Tensor:
    """A column order ``perm`` (position p holds original column ``perm[p]``) that keeps more score under N:M.

    Start: channels sorted by total score, dealt round-robin so each group of M gets one channel of each
    tier. Then, for each slot of the groups in turn, the channels in that slot are re-assigned to groups
    by an optimal assignment (Hungarian, scipy) of the exact gain: a channel c added to a group whose other
    M-1 entries have N-th largest value t gains sum over rows of max(0, s_c - t). Each assignment can only
    raise the kept score; the identity order is returned if it keeps more.
    """
    from scipy.optimize import linear_sum_assignment

    rows, cols = scores.shape
    m, n = pattern.m, pattern.n
    identity = torch.arange(cols)
    if n >= m or cols <= m:
        return identity
    s = scores.float()
    g = cols // m
    order = torch.argsort(s.sum(0), descending=True, stable=True)
    groups = order.reshape(m, g).T.contiguous()  # [g, m]: groups[j, t] = channel of rank t*g + j
    for _ in range(rounds):
        for t in range(m):
            others = torch.cat([groups[:, :t], groups[:, t + 1:]], dim=1)  # [g, m-1]
            if n > m - 1:
                continue
            thr = s[:, others].topk(n, dim=-1).values[..., -1]  # [rows, g]: N-th largest of the others
            cand = s[:, groups[:, t]]  # [rows, g]
            gain = _gain(cand, thr, chunk_elems)
            ci, gj = linear_sum_assignment(gain.numpy(), maximize=True)
            slot = groups[:, t].clone()
            groups[torch.as_tensor(gj), t] = slot[torch.as_tensor(ci)]
    perm = groups.reshape(-1)
    return perm if retained(s, pattern, perm) > retained(s, pattern) else identity


def _gain(cand: torch.Tensor, thr: torch.Tensor, chunk_elems: int) -> torch.Tensor:
    """gain[c, j] = sum over rows of max(0, cand[:, c] - thr[:, j]), in chunks of candidates."""
    rows, g = cand.shape
    ct, tt = cand.T.contiguous(), thr.T.contiguous()
    gain = torch.empty(g, g, dtype=torch.float64)
    step = max(1, chunk_elems // (g * rows))
    for c0 in range(0, g, step):
        gain[c0:c0 + step] = (ct[c0:c0 + step, None, :] - tt[None]).clamp_min_(0).sum(-1).double()
    return gain


def permuted_nm_mask(scores: torch.Tensor, pattern: NM, rounds: int = 1, then=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep-mask in the original column order, the order ``perm`` it is N:M in): ``keep[:, perm]`` is N:M.

    ``then(keep, perm)``, if given, adjusts the mask while it is still in permuted order (where the groups of M
    are) and returns it, e.g. a refinement that must keep each group N:M."""
    perm = nm_permutation(scores, pattern, rounds)
    chosen = select(scores[:, perm], pattern)
    keep = torch.empty_like(scores, dtype=torch.bool)
    keep[:, perm] = chosen if then is None else then(chosen, perm)
    return keep, perm


def permuted_nm_select(scores: torch.Tensor, pattern: NM, rounds: int = 1, then=None) -> torch.Tensor:
    """Keep-mask in the original column order that is N:M in the order ``nm_permutation`` finds."""
    return permuted_nm_mask(scores, pattern, rounds, then)[0]


def stored_order(perm: torch.Tensor | None) -> torch.Tensor | None:
    """``perm`` as a CPU int64 tensor, or None when it is the identity (the mask is N:M as stored)."""
    if perm is None:
        return None
    perm = perm.detach().to("cpu", torch.int64)
    return None if torch.equal(perm, torch.arange(perm.numel())) else perm


def is_order(perm: torch.Tensor, cols: int) -> bool:
    """Whether ``perm`` is a permutation of ``range(cols)`` (a 1-D integer tensor holding each column once)."""
    if perm.dim() != 1 or perm.numel() != cols or perm.is_floating_point() or perm.dtype == torch.bool:
        return False
    return torch.equal(perm.long().sort().values, torch.arange(cols, device=perm.device))


def index_dtype(cols: int) -> torch.dtype:
    """The smallest stored integer type for column indices below ``cols``: int16 up to 32768 columns, else int32."""
    return torch.int16 if cols <= 2**15 else torch.int32


def _wire_dtype(cols: int) -> str:
    """The numpy type of a recorded order: ``index_dtype`` of ``cols``, little-endian."""
    return "<i2" if index_dtype(cols) == torch.int16 else "<i4"


def order_to_text(perm: torch.Tensor) -> str:
    """A column order as JSON-friendly text: base64 of its little-endian ``index_dtype`` bytes."""
    raw = perm.to("cpu", torch.int64).numpy().astype(_wire_dtype(perm.numel()))
    return base64.b64encode(raw.tobytes()).decode("ascii")


def order_from_text(text: str, cols: int) -> torch.Tensor:
    """The inverse of ``order_to_text`` for a layer of ``cols`` input columns (int64); a ValueError if it is not
    a permutation of them."""
    import numpy as np

    perm = torch.from_numpy(np.frombuffer(base64.b64decode(text), dtype=_wire_dtype(cols)).astype(np.int64))
    if not is_order(perm, cols):
        raise ValueError(f"a recorded column order is not a permutation of {cols} columns")
    return perm


@dataclass(frozen=True)
class Permute:
    """The modifier ``--permute``: a score method (or ALPS) chooses its N:M masks on input channels reordered so
    that more score survives (``permuted_nm_select``; the method's ``permute`` field switches it on)."""

    kind: ClassVar[str] = "permute"

    def apply(self, method):
        if not (dataclasses.is_dataclass(method) and any(f.name == "permute" for f in dataclasses.fields(method))):
            from .methods import permutable_names

            raise UsageError(f"--permute works with the score methods ({', '.join(permutable_names())}), "
                             f"not {method.name}")
        return dataclasses.replace(method, permute=True)
