"""SparseGPT per Linear at Llama-2-7B shapes on a GPU: the Triton block kernel against the torch solver.

Times ``SparseGPT.prune`` (what the runner calls for every Linear) for unstructured 50% and 2:4,
with a random SPD Hessian built from correlated random inputs, after a warm-up; checks that both
solvers agree (masks, N:M counts, output error on the inputs). The torch solver's 2:4 path is slow,
so on the wider shapes it runs on a slice of the rows (rows are pruned independently). Also sweeps
the kernel's tile (rows per program, warps), and with ``--e2e`` times the whole pruning of a
Llama-2-7B-shaped model against two plain forward passes, as ``gpu_check.py`` does.

    python benchmarks/sparsegpt_gpu.py --out benchmarks/results/sparsegpt_gpu_h200.json [--e2e]
    TRITON_INTERPRET=1 python benchmarks/sparsegpt_gpu.py --smoke --out /tmp/smoke.json  # the script on a CPU
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from llmprune import NM, Unstructured, report
from llmprune.devices import synchronize
from llmprune.methods import SparseGPT
from llmprune.methods import sparsegpt_kernel as kernel
from llmprune.methods.sparsegpt import inverse_cholesky
from llmprune.stats import Hessian

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # [out, in]: q/k/v/o, gate/up, down
SMOKE_SHAPES = [(40, 128), (24, 64)]
PATTERNS = [Unstructured(0.5), NM(2, 4)]
TILES = [(16, 2), (16, 4), (32, 4), (32, 8), (64, 4), (64, 8)]  # (rows per program, warps)
TORCH_ROWS = 1024  # rows the slow torch 2:4 solver prunes on the wider shapes


def inputs(cols, tokens, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, device=device) / cols**0.5
    return torch.randn(tokens, cols, generator=g, device=device) @ (torch.eye(cols, device=device) + mix)


def hessian_of(x):
    h = Hessian(x.shape[1], x.device)
    h.add(x)
    return h


def timed(fn, device, reps):
    """Median seconds of ``reps`` calls of ``fn`` (already warmed up), and the last result."""
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def factorise_s(h, device):
    inverse_cholesky(h, 0.01)  # warm-up: solver handles
    h.memo.clear()
    seconds, _ = timed(lambda: inverse_cholesky(h, 0.01), device, 1)
    return seconds


def output_error(x, w, w_hat):
    ref = x @ w.T
    return float(torch.linalg.norm(ref - x @ w_hat.T) / torch.linalg.norm(ref))


def agreement(x, w, a, b, pattern):
    (aw, ak), (bw, bk) = a, b
    row = {"mask_agreement": float((ak == bk).float().mean()),
           "output_error_triton": output_error(x, w, aw), "output_error_torch": output_error(x, w, bw)}
    if isinstance(pattern, NM):
        row["nm_exact_triton"] = bool((ak.reshape(ak.shape[0], -1, pattern.m).sum(-1) == pattern.n).all())
    return row


def measure_shape(rows, cols, device, reps, torch_budget_s):
    x = inputs(cols, max(2 * cols, 4096), device)
    h = hessian_of(x)
    w = torch.randn(rows, cols, device=device) * 0.02
    stats = {"hessian": h}
    out = {"shape": [rows, cols], "factorise_s": factorise_s(h, device), "patterns": []}
    xs = x[:2048]
    for pattern in PATTERNS:
        triton_method, torch_method = SparseGPT(solver="triton"), SparseGPT(solver="torch")
        triton_method.prune(w, stats, pattern)  # compile
        t_s, a = timed(lambda: triton_method.prune(w, stats, pattern), device, reps)
        row = {"pattern": str(pattern), "triton_ms": 1e3 * t_s}
        sub = w if isinstance(pattern, Unstructured) or rows * cols <= 4096 * 4096 else w[:TORCH_ROWS]
        if sub.shape[0] < rows:
            row["torch_rows"] = sub.shape[0]
        if torch_budget_s["left"] > 0:
            o_s, b = timed(lambda: torch_method.prune(sub, stats, pattern), device, 1 if isinstance(pattern, NM) else 2)
            torch_budget_s["left"] -= o_s
            row["torch_ms"] = 1e3 * o_s
            row["speedup"] = o_s / t_s * (rows / sub.shape[0])  # on a row slice: scaled by rows, an upper bound
            row.update(agreement(xs, sub, (a[0][: sub.shape[0]], a[1][: sub.shape[0]]), b, pattern))
        out["patterns"].append(row)
        print(out["shape"], row, flush=True)
    return out


def sweep_tiles(rows, cols, device, reps):
    x = inputs(cols, max(2 * cols, 4096), device, seed=1)
    stats = {"hessian": hessian_of(x)}
    w = torch.randn(rows, cols, device=device) * 0.02
    default = (kernel.ROWS, kernel.WARPS)
    out = []
    try:
        for tile in TILES:
            kernel.ROWS, kernel.WARPS = tile
            for pattern in PATTERNS:
                method = SparseGPT(solver="triton")
                method.prune(w, stats, pattern)
                seconds, _ = timed(lambda: method.prune(w, stats, pattern), device, reps)
                out.append({"shape": [rows, cols], "rows_per_program": tile[0], "warps": tile[1],
                            "pattern": str(pattern), "ms": 1e3 * seconds})
                print(out[-1], flush=True)
    finally:
        kernel.ROWS, kernel.WARPS = default
    return out


def end_to_end(out, path):
    """Whole-model SparseGPT on a Llama-2-7B-shaped bf16 model (random weights) against the floor."""
    from gpu_check import floor_time, llama7b, timed_prune

    tokens = torch.randint(0, 32000, (128, 2048), generator=torch.Generator().manual_seed(0))
    model = llama7b(torch.bfloat16)
    e2e = {"calibration": [128, 2048], "batch": 8, "floor_two_forwards_s": floor_time(model, tokens, 8), "runs": []}
    out["llama7b"] = e2e
    print(e2e, flush=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for pattern in (NM(2, 4), Unstructured(0.5)):
        model.load_state_dict(state)
        run = timed_prune(model, tokens, "sparsegpt", pattern, 8)
        run["x_floor"] = run["prune_s"] / e2e["floor_two_forwards_s"]
        e2e["runs"].append(run)
        print(run, flush=True)
        report.write_json(path, out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch-budget", type=float, default=30.0, help="seconds for the slow torch solver in all")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (with TRITON_INTERPRET=1)")
    ap.add_argument("--e2e", action="store_true", help="also prune a whole Llama-2-7B-shaped model")
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    out = {"host": platform.node(), "versions": report.versions(), "triton": kernel.triton.__version__,
           "gpu": None if args.smoke else torch.cuda.get_device_name(0), "dtype": "float32",
           "default_tile": [kernel.ROWS, kernel.WARPS], "per_linear": [], "tiles": []}
    budget = {"left": args.torch_budget}
    for rows, cols in shapes:
        out["per_linear"].append(measure_shape(rows, cols, device, args.reps, budget))
        report.write_json(args.out, out)
    for rows, cols in shapes[:2]:
        out["tiles"] += sweep_tiles(rows, cols, device, args.reps)
        report.write_json(args.out, out)
    if args.e2e:
        end_to_end(out, args.out)
    report.write_json(args.out, out)


if __name__ == "__main__":
    main()
