"""Per-Linear prune time at Llama-2-7B shapes: N:M mask selection, Wanda, and ALPS against SparseGPT.

Three parts, each on random weights and statistics of the three Llama-2-7B Linear shapes (out x in: 4096x4096
q/k/v/o, 11008x4096 gate/up, 4096x11008 down), timed after a warm-up (median of ``--reps``):

* ``select``: the N:M keep-mask of 2:4 by a stable sort over groups of 4 against the comparison ranks
  (``patterns.nm_ranks``, what a GPU uses), masks checked equal; the unstructured per-row sort beside them.
* ``wanda``: ``Wanda.prune`` for unstructured 50% and 2:4, what the runner calls per Linear.
* ``alps``: ``ALPS.prune`` against ``SparseGPT.prune`` (its default solver) on the same Hessian, at 2:4 and
  70% unstructured, one call each (ALPS runs seconds per Linear), with both outputs' relative error on the
  inputs. A block is 4 Linears of the first shape, 2 of the second and 1 of the third: the per-block sum
  times 32 blocks projects the whole 7B model's pruning maths (statistics and propagation not included).

    python benchmarks/prune_time_gpu.py --out benchmarks/results/prune_time_h200.json
    python benchmarks/prune_time_gpu.py --smoke --out /tmp/prune_time.json   # tiny shapes, any device
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from llmprune import NM, Unstructured, report
from llmprune.devices import synchronize
from llmprune.methods import ALPS, SparseGPT, Wanda
from llmprune.patterns import _prune_lowest, nm_ranks
from llmprune.stats import Hessian, InputNorms

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
SMOKE_SHAPES = [(64, 64), (176, 64), (64, 176)]
PER_BLOCK = (4, 2, 1)  # Linears of each shape in a Llama block
BLOCKS = 32


def timed(fn, device, reps: int, warm: bool = True):
    if warm:
        fn()
    times, out = [], None
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def inputs(cols: int, tokens: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, device=device) / cols**0.5
    return torch.randn(tokens, cols, generator=g, device=device) @ (torch.eye(cols, device=device) + mix)


def select_part(shapes, device, reps: int) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        scores = torch.rand(out_f, in_f, device=device)
        groups = scores.reshape(-1, 4)
        sort_s, by_sort = timed(lambda: _prune_lowest(groups, 2), device, reps)
        rank_s, by_rank = timed(lambda: nm_ranks(groups) >= 2, device, reps)
        row_s, _ = timed(lambda: _prune_lowest(scores, in_f // 2), device, reps)
        rows.append({"shape": [out_f, in_f], "nm_sort_ms": 1e3 * sort_s, "nm_rank_ms": 1e3 * rank_s,
                     "unstructured_row_sort_ms": 1e3 * row_s, "masks_equal": bool(torch.equal(by_sort, by_rank))})
        print(rows[-1], flush=True)
    return rows


def wanda_part(shapes, device, reps: int) -> list[dict]:
    rows = []
    for out_f, in_f in shapes:
        w = (torch.randn(out_f, in_f, device=device) * 0.02).to(torch.bfloat16)
        norms = InputNorms(in_f, device)
        norms.add(inputs(in_f, 2048, device))
        stats = {"norms": norms}
        row = {"shape": [out_f, in_f]}
        for pattern in (Unstructured(0.5), NM(2, 4)):
            seconds, _ = timed(lambda: Wanda().prune(w, stats, pattern), device, reps)
            row[f"{pattern}_ms"] = 1e3 * seconds
        rows.append(row)
        print(row, flush=True)
    return rows


def output_error(x, w, w_hat) -> float:
    ref = x @ w.T
    return float(torch.linalg.norm(ref - x @ w_hat.float().T) / torch.linalg.norm(ref))


def alps_part(shapes, device, tokens: int) -> dict:
    rows, per_block = [], {}
    small = Hessian(256, device)
    small.add(inputs(256, 1024, device, seed=1))
    for pattern in (NM(2, 4), Unstructured(0.7)):  # warm-up once: kernels compiled, solver handles made
        for method in (SparseGPT(), ALPS()):
            method.prune(torch.randn(128, 256, device=device), {"hessian": small}, pattern)
    for (out_f, in_f), count in zip(shapes, PER_BLOCK):
        x = inputs(in_f, tokens, device)
        h = Hessian(in_f, device)
        h.add(x)
        w = torch.randn(out_f, in_f, device=device) * 0.02
        stats, xs = {"hessian": h}, x[:2048]
        for pattern in (NM(2, 4), Unstructured(0.7)):
            label = str(pattern) if isinstance(pattern, NM) else f"{round(100 * pattern.sparsity)}%"
            row = {"shape": [out_f, in_f], "pattern": label}
            for name, method in (("sparsegpt", SparseGPT()), ("alps", ALPS())):
                h.memo.clear()  # each method factorises the Hessian itself, as in a run
                seconds, (w_hat, _) = timed(lambda: method.prune(w, stats, pattern), device, 1, warm=False)
                row[f"{name}_s"], row[f"{name}_error"] = seconds, output_error(xs, w, w_hat)
                key = (label, name)
                per_block[key] = per_block.get(key, 0.0) + count * seconds
            rows.append(row)
            print(row, flush=True)
    model = {f"{p} {n}": BLOCKS * s for (p, n), s in per_block.items()}
    return {"rows": rows, "projected_model_s": model, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=16384, help="calibration tokens behind each Hessian")
    ap.add_argument("--parts", default="select,wanda,alps")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    result = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
              "versions": report.versions(), "command": "python benchmarks/prune_time_gpu.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False)),
              "shapes": shapes, "reps": args.reps}
    parts = args.parts.split(",")
    if "select" in parts:
        result["select"] = select_part(shapes, device, args.reps)
    if "wanda" in parts:
        result["wanda"] = wanda_part(shapes, device, args.reps)
    report.write_json(args.out, result)
    if "alps" in parts:
        result["alps"] = alps_part(shapes, device, args.tokens if not args.smoke else 512)
    report.write_json(args.out, result)


if __name__ == "__main__":
    main()
