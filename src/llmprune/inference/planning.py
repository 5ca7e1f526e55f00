"""Planning: dense or sparse, and which cuSPARSELt algorithm, per weight shape and token bucket.

Both are timed once, at swap time; sparse is chosen only where it beats dense by a margin.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .. import devices
from .kernel import BUCKETS, PAD, Algo, Choice, Kernels, Plan, SparseCore

MARGIN = 0.95  # sparse must be at least 5% faster to be chosen: ties go to dense


def timeit(fn, reps: int, warmup: int = 1) -> float:
    """Seconds per call of back-to-back calls (host cost included), median of 3 rounds."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(3):
        devices.synchronize_cuda()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        devices.synchronize_cuda()
        rounds.append((time.perf_counter() - t0) / reps)
    return sorted(rounds)[1]


def graph_time(fn, reps: int = 10) -> float:
    """Seconds per call, GPU time alone: ``reps`` calls captured in one CUDA graph, replayed."""
    with devices.side_stream():
        for _ in range(2):
            fn()

    def calls():
        for _ in range(reps):
            fn()

    graph = devices.capture_graph(calls)
    t = timeit(graph.replay, reps=3) / reps
    del graph
    return t


def search_algos(core: SparseCore, x: torch.Tensor) -> list[Algo]:
    """The configurations to time for input ``x``: cuSPARSELt's own pick (algorithm 0 where the search fails).

    Split-k is not among them: on the H200 (torch 2.11, cuSPARSELt 0.8) the search never proposes it
    (split_k -1), and setting split-k 2 or 4 by hand is refused ("invalid value").
    """
    xp = F.pad(x, (0, 0, 0, (-x.shape[0]) % PAD))
    try:
        alg = Kernels.search(core.packed, xp.t())
    except RuntimeError:
        return [Algo()]
    return [Algo(int(alg))]


def choose(dense_s: float, sparse_s: dict) -> tuple[Choice, float]:
    """The fastest sparse configuration, used only if it beats dense by the margin; returns (choice, its time)."""
    algo = min(sparse_s, key=sparse_s.get)
    return Choice(sparse_s[algo] < MARGIN * dense_s, algo), sparse_s[algo]


@torch.no_grad()
def plan_cores(cores: list[SparseCore], plan: Plan, buckets=BUCKETS, reps: int = 10) -> Plan:
    """Time dense vs sparse (cuSPARSELt's best configuration) once per distinct weight shape and token bucket.

    Two timings: back-to-back calls ("eager": cuSPARSELt's per-call host cost, ~0.5 ms in torch 2.11,
    counts) and CUDA-graph replay ("graph": GPU time alone, used while a graph is being captured).
    Where ``search_algos`` offers several configurations the fastest is kept.
    """
    seen = {}
    for core in cores:
        seen.setdefault(core.key, core)
    for key, core in seen.items():
        for t in buckets:
            x = torch.randn(t, core.dense.shape[1], dtype=core.dense.dtype, device=core.dense.device)
            algos = search_algos(core, x)
            modes = {"eager": timeit}
            if x.is_cuda:
                modes["graph"] = graph_time
            for mode, timer in modes.items():
                dense_s = timer(lambda: F.linear(x, core.dense, core.bias), reps)
                sparse_s = {a: timer(lambda: core.sparse_mm(x, a), reps) for a in algos}
                choice, best = choose(dense_s, sparse_s)
                plan.choices[(mode, key, t)] = choice
                plan.timings.append({"mode": mode, "shape": list(key[:2]), "dtype": key[2], "gather": key[3], "tokens": t,
                                     "alg": choice.algo.alg, "dense_ms": dense_s * 1e3, "sparse_ms": best * 1e3,
                                     "candidates": [{"alg": a.alg, "ms": v * 1e3} for a, v in sparse_s.items()],
                                     "chosen": "sparse" if choice.sparse else "dense"})
    return plan
