"""The cost of --permute's gather on the 2:4 path: x[:, perm] before the cuSPARSELt matmul, against the matmul alone.

Llama-7B Linear shapes (out x in: 4096x4096 q/k/v/o, 11008x4096 gate/up, 4096x11008 down), random weights that
are 2:4 only in a random input order. Per shape and token count, in the library's own ``SparseCore``:

  dense_ms      F.linear with the weight as stored (what a permuted Linear costs on the dense path)
  gather_ms     x.index_select(1, perm) alone
  sparse_ms     the sparse matmul of an input gathered beforehand (a core without an order: a folded Linear)
  gathered_ms   the sparse matmul with its gather (a core with the order: what a permuted Linear runs)
  gather_share  gathered_ms / sparse_ms - 1: what the gather adds to the sparse matmul

each timed as back-to-back calls ("eager", host cost included) and, on CUDA, as CUDA-graph replay ("graph",
GPU time alone). Every row also checks the gathered output against dense and against the sparse matmul of the
gathered input. Writes one JSON:

    python benchmarks/perm_gather.py --out benchmarks/results/perm_gather_h200.json

``--device cpu`` is a dry run of the script for correctness: tiny shapes, cuSPARSELt replaced by a dense matmul
of the compressed (= permuted dense) weight; its times say nothing about the GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from llmprune import devices
from llmprune.inference import kernel, planning
from llmprune.patterns import NM, select
from llmprune.report import versions

SHAPES_7B = ((4096, 4096), (11008, 4096), (4096, 11008))
SHAPES_CPU = ((64, 32), (32, 64))
TOKENS = (1, 16, 256, 2048, 16384)


@contextmanager
def emulated_kernels():
    """cuSPARSELt's three entry points as dense CPU operations (compress keeps the matrix, mm = (A @ B)^T)."""
    saved = {name: getattr(kernel.Kernels, name) for name in ("compress", "search", "mm")}
    kernel.Kernels.compress = staticmethod(lambda w: w.clone())
    kernel.Kernels.search = staticmethod(lambda packed, b: 0)
    kernel.Kernels.mm = staticmethod(
        lambda packed, b, bias, algo: (packed @ b).t().contiguous() if bias is None else (packed @ b).t() + bias)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(kernel.Kernels, name, staticmethod(fn))


def permuted_24(out_f: int, in_f: int, dtype, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, perm): a random weight whose magnitude 2:4 mask is taken in the random order perm."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(in_f, generator=g)
    w = torch.randn(out_f, in_f, generator=g)
    w[:, perm] = w[:, perm] * select(w[:, perm].abs(), NM(2, 4))
    return w.to(device, dtype), perm.to(device)


def _timers(cuda: bool) -> dict:
    return {"eager": planning.timeit, **({"graph": planning.graph_time} if cuda else {})}


def _checks(w, perm, x, gathered, plain) -> dict:
    y = gathered.sparse_mm(x)
    ref = F.linear(x, w).float()
    rel = float((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    return {"max_rel_err_vs_dense": rel, "equals_sparse_of_gathered": bool(torch.equal(y, plain.sparse_mm(x[:, perm])))}


@torch.no_grad()
def bench_shape(out_f: int, in_f: int, tokens, dtype, device, reps: int) -> list[dict]:
    """One row per token count for one weight shape (see the module docstring)."""
    w, perm = permuted_24(out_f, in_f, dtype, device)
    plan = kernel.Plan(force=True)
    gathered = kernel.SparseCore(w, None, plan, perm)
    plain = kernel.SparseCore(w[:, perm].contiguous(), None, plan)
    rows = []
    for t in tokens:
        x = torch.randn(t, in_f, dtype=dtype, device=device)
        xg = x[:, perm].contiguous()
        row = {"out": out_f, "in": in_f, "tokens": t, **_checks(w, perm, x, gathered, plain)}
        fns = {"dense": lambda: F.linear(x, w), "gather": lambda: x.index_select(1, perm),
               "sparse": lambda: plain.sparse_mm(xg), "gathered": lambda: gathered.sparse_mm(x)}
        for mode, timer in _timers(x.is_cuda).items():
            ms = {label: 1e3 * timer(fn, reps) for label, fn in fns.items()}
            row[mode] = {**{f"{k}_ms": v for k, v in ms.items()}, "gather_share": ms["gathered"] / ms["sparse"] - 1}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def run(shapes, tokens, dtype, device, reps: int = 20) -> dict:
    emulate = device.type != "cuda"
    with emulated_kernels() if emulate else nullcontext():
        rows = [r for out_f, in_f in shapes for r in bench_shape(out_f, in_f, tokens, dtype, device, reps)]
    return {"what": __doc__.splitlines()[0], "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "emulated_kernels": emulate, "reps": reps, "rows": rows, "versions": versions()}


def _shapes(text: str) -> tuple[tuple[int, int], ...]:
    try:
        out = tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes takes OUTxIN pairs such as 4096x4096,11008x4096, got {text!r}")
    if any(len(s) != 2 or s[1] % 4 or min(s) < 1 for s in out):
        raise argparse.ArgumentTypeError(f"--shapes: each is OUTxIN with IN a multiple of 4, got {text!r}")
    return out


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens takes a comma list of integers, got {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a dry run, tiny shapes)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--shapes", type=_shapes, default=None,
                   help="OUTxIN list; default Llama-7B's 4096x4096,11008x4096,4096x11008 (cpu: 64x32,32x64)")
    p.add_argument("--tokens", type=_ints, default=TOKENS)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/perm_gather.json"))
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    device = devices.resolve_device(a.device)
    shapes = a.shapes or (SHAPES_7B if device.type == "cuda" else SHAPES_CPU)
    result = run(shapes, a.tokens, getattr(torch, a.dtype), device, a.reps)
    result["command"] = "python " + " ".join(sys.argv if argv is None else ["benchmarks/perm_gather.py", *argv])
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
