"""The cuSPARSELt binding, called directly (no tensor subclass, no F.linear dispatch), and the module that uses it.

A ``SparseCore`` keeps its weight twice: compressed for ``torch._cslt_sparse_mm`` and dense for the token
counts where dense is faster. Which one runs is looked up per call in a ``Plan`` (weight shape and
token-count bucket), which ``planning.plan_cores`` fills by timing both once.

Layout: cuSPARSELt multiplies sparse(A) @ dense(B). With A = W [out, in] (2:4 along ``in``) and
B = x^T (a free transposed view of the row-major activations), ``transpose_result=True`` makes the
product come out as y = x W^T, row-major [tokens, out]: no copy before or after the kernel.

A weight pruned with ``--permute`` is 2:4 only in a permuted input-column order ``perm``: its core compresses
W[:, perm] and gathers the activation's columns into the same order first, y = x[:, perm] W[:, perm]^T = x W^T.
The gather is one extra read and write of the activations per call (``benchmarks/perm_gather.py`` times it);
``swap`` folds the order into the previous Linear where that is exact, and then no gather is needed.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError

BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # token counts timed at swap time
PAD = 8  # cuSPARSELt's dense operand needs a multiple of 8 columns in bf16/fp16


@dataclass(frozen=True)
class Algo:
    """A cuSPARSELt configuration: the algorithm id (split-k stays at the library's default)."""

    alg: int = 0


def _search(packed: torch.Tensor, b: torch.Tensor) -> int:
    """The algorithm id cuSPARSELt's own search picks: ``torch._C._cusparselt.mm_search`` where torch has it
    (its split-k results are dropped, see ``planning.search_algos``), else the older
    ``torch._cslt_sparse_mm_search``."""
    cslt = getattr(torch._C, "_cusparselt", None)
    if cslt is not None and hasattr(cslt, "mm_search"):
        return int(cslt.mm_search(packed, b, None, None, None, True)[0])
    return int(torch._cslt_sparse_mm_search(packed, b, transpose_result=True))


def _mm(packed: torch.Tensor, b: torch.Tensor, bias, algo: Algo) -> torch.Tensor:
    return torch._cslt_sparse_mm(packed, b, bias, transpose_result=True, alg_id=algo.alg)


class Kernels:
    """The three cuSPARSELt entry points; replaced by an emulation in CPU tests."""

    compress = staticmethod(lambda w: torch._cslt_compress(w))
    search = staticmethod(_search)
    mm = staticmethod(_mm)


def is_2to4(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


def bucket_of(tokens: int) -> int:
    """The smallest timed token count >= ``tokens`` (the largest beyond the last)."""
    for b in BUCKETS:
        if tokens <= b:
            return b
    return BUCKETS[-1]


@dataclass
class Choice:
    sparse: bool = False
    algo: Algo = Algo()


@dataclass
class Plan:
    """Per (out, in, dtype) and token bucket: sparse or dense, and the cuSPARSELt algorithm id."""

    choices: dict = field(default_factory=dict)
    timings: list = field(default_factory=list)
    force: bool | None = None  # True: sparse everywhere, False: dense everywhere (tests, checks)
    mode: str = "eager"  # "graph" while capturing a CUDA graph: choices timed as GPU time alone

    def get(self, key, tokens: int) -> Choice:
        b = bucket_of(tokens)
        choice = self.choices.get((self.mode, key, b)) or self.choices.get(("eager", key, b), Choice())
        return choice if self.force is None else Choice(self.force, choice.algo)

    @contextmanager
    def capturing(self):
        """While a CUDA graph is captured: each Linear takes the choice timed as GPU time alone ("graph").

        The choice is made in Python during capture, so a replay runs only the kernels chosen then.
        """
        before, self.mode = self.mode, "graph"
        try:
            yield self
        finally:
            self.mode = before


def in_order(weight: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """The weight with its input columns in ``perm`` order (position p holds column perm[p]); as it is for None."""
    return weight if perm is None else weight[:, perm]


class SparseCore(nn.Module):
    """y = x W^T (+ b) with W kept dense and cuSPARSELt-compressed; the plan picks per call.

    ``perm``: W is 2:4 in that input-column order (``--permute``); the compressed weight is W[:, perm] and the
    sparse call gathers ``x[:, perm]`` first. The dense call uses W as stored and gathers nothing.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan,
                 perm: torch.Tensor | None = None):
        super().__init__()
        if weight.is_cuda and weight.dtype == torch.float16:
            raise UsageError("the 2:4 GPU path runs in bfloat16 only: in float16 cuSPARSELt's search fails (algorithm "
                             "id 36 raises an illegal instruction on the H200, torch 2.11) and algorithm 0 is slower "
                             "than dense; load the model with --dtype bfloat16")
        if perm is not None:
            perm = perm.to(weight.device, torch.int64)
        stored = in_order(weight, perm)
        if not is_2to4(stored):
            where = " in its input permutation" if perm is not None else ""
            raise UsageError(f"a {tuple(weight.shape)} weight is not 2:4 sparse{where}; prune it with --pattern 2:4 first")
        self.register_buffer("dense", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("packed", Kernels.compress(stored.contiguous()), persistent=False)
        self.plan = plan
        self.key = (weight.shape[0], weight.shape[1], str(weight.dtype), perm is not None)
        """(out, in, dtype, gathers): cores that gather are timed apart, their sparse time includes the gather."""

    def sparse_mm(self, x2: torch.Tensor, algo: Algo = Algo()) -> torch.Tensor:
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)  # the activation's columns in the order the weight is 2:4 in
        t = x2.shape[0]
        pad = (-t) % PAD
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        y = Kernels.mm(self.packed, x2.t(), self.bias, algo)
        return y[:t] if pad else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        choice = self.plan.get(self.key, x2.shape[0])
        if not choice.sparse:
            return F.linear(x, self.dense, self.bias)
        return self.sparse_mm(x2, choice.algo).view(*x.shape[:-1], self.dense.shape[0])
