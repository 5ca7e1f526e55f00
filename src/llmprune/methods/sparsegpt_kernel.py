"""Triton kernel for one SparseGPT column block (imported only where triton is installed).

Given U, the upper Cholesky factor of H^-1 on the block, every row is pruned independently:
its N:M choices depend only on its own weights as updated so far. So each program holds a
tile of rows of the block in registers and walks the block's columns in order, as the
paper's loop does; a Linear costs one launch per block instead of several per group.

Per column k: e = w_k * pruned_k / U_kk, w -= e U_k (only later columns change, w_k -> 0),
e is written to the error output. An N:M group's mask is chosen at its first column from
w^2 / U_kk^2, with the tie rule of ``patterns.select``: among equal scores the earlier
column is pruned. Without N:M the mask is given (chosen up front for the whole block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..patterns import NM, Pattern

ROWS = 32  # rows of the weight per program
WARPS = 4


@triton.jit
def _choose_group(w, diag, keep, cols, a, N: tl.constexpr, M: tl.constexpr):
    """Keep-mask with the group of columns a..a+M-1 chosen: the M-N lowest scores are pruned."""
    score = w * w / (diag * diag)[None, :]
    rank = tl.zeros(w.shape, dtype=tl.int32)  # per column: how many of its group are pruned before it
    for j in tl.static_range(M):
        sj = tl.sum(tl.where(cols[None, :] == a + j, score, 0.0), axis=1)[:, None]
        before = (sj < score) | ((sj == score) & (cols[None, :] > a + j))
        rank += before.to(tl.int32)
    group = (cols >= a) & (cols < a + M)
    return tl.where(group[None, :], rank >= M - N, keep)


@triton.jit
def _block_kernel(w_ptr, u_ptr, keep_ptr, err_ptr, rows, width, stride_w, stride_u, stride_keep, stride_err,
                  N: tl.constexpr, M: tl.constexpr, GIVEN: tl.constexpr, R: tl.constexpr, BS: tl.constexpr):
    r = tl.program_id(0) * R + tl.arange(0, R)
    cols = tl.arange(0, BS)
    in_rows, in_cols = r < rows, cols < width
    tile = in_rows[:, None] & in_cols[None, :]
    w = tl.load(w_ptr + r[:, None] * stride_w + cols[None, :], mask=tile, other=0.0)
    diag = tl.load(u_ptr + cols * (stride_u + 1), mask=in_cols, other=1.0)
    keep_at = keep_ptr + r[:, None] * stride_keep + cols[None, :]
    if GIVEN:
        keep = tl.load(keep_at, mask=tile, other=1) != 0
    else:
        keep = tl.full((R, BS), 1, dtype=tl.int1)
    for a in range(0, BS, M):  # a constant bound (Triton 3.6's interpreter cannot loop to an argument)
        if not GIVEN:
            keep = _choose_group(w, diag, keep, cols, a, N, M)
        for j in tl.static_range(M):
            k = a + j  # columns beyond ``width`` hold zeros: errors 0, written to the padding of the error buffer
            u_kk = tl.load(u_ptr + tl.minimum(k, width - 1) * (stride_u + 1))  # in bounds beyond ``width``
            e = tl.sum(tl.where((cols[None, :] == k) & ~keep, w, 0.0), axis=1) / u_kk
            u_k = tl.load(u_ptr + k * stride_u + cols, mask=(cols >= k) & in_cols, other=0.0)
            w -= e[:, None] * u_k[None, :]
            tl.store(err_ptr + r * stride_err + k, e, mask=in_rows)
    tl.store(w_ptr + r[:, None] * stride_w + cols[None, :], tl.where(keep, w, 0.0), mask=tile)
    if not GIVEN:
        tl.store(keep_at, keep.to(tl.uint8), mask=tile)


def prune_block(w: torch.Tensor, keep: torch.Tensor, u: torch.Tensor, pattern: Pattern,
                rows_per_program: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Prune the block ``w`` [rows, width] in place; returns the errors [rows, width].

    ``keep`` is read (unstructured: chosen before) or written (N:M); ``u`` is the block's
    [width, width] upper factor. Rows must be contiguous in memory (column stride 1). The tile
    (``ROWS``, ``WARPS`` unless given) changes the speed only.
    """
    rows_per_program, num_warps = rows_per_program or ROWS, num_warps or WARPS
    assert w.stride(1) == 1 and u.stride(1) == 1 and keep.stride(1) == 1 and u.dtype == w.dtype
    rows, width = w.shape
    padded = triton.next_power_of_2(width)
    err = w.new_empty(rows, padded)
    nm = isinstance(pattern, NM)
    if nm:
        assert width % pattern.m == 0
    grid = (triton.cdiv(rows, rows_per_program),)
    _block_kernel[grid](w, u, keep.view(torch.uint8), err, rows, width, w.stride(0), u.stride(0), keep.stride(0),
                        err.stride(0), N=pattern.n if nm else 0, M=pattern.m if nm else 1, GIVEN=not nm,
                        R=rows_per_program, BS=padded, num_warps=num_warps)
    return err[:, :width]
