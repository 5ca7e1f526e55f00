"""float16 2:4 on this GPU: GPU time of every cuSPARSELt algorithm id that runs, against dense.

cuSPARSELt's own search fails in float16 here (see cslt_fp16.py), so this times the ids by hand:
each one captured in a CUDA graph (GPU time alone) at a few Llama-2-7B shapes, plus the host cost of
one eager call for a few ids. Writes one JSON:

    python benchmarks/cslt_fp16_algs.py --out benchmarks/results/cslt_fp16_algs_h200.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from llmprune.inference.planning import graph_time, timeit
from sparse24 import mask_24


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--algs", type=int, default=36, help="ids 0..N-1 (id 36 raised an illegal instruction here)")
    ap.add_argument("--cases", default="4096x4096x16,4096x4096x2048,22016x4096x2048", help="out x in x tokens")
    a = ap.parse_args()
    dt = torch.float16
    result = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(),
              "dtype": "float16", "timing": "CUDA-graph replay, 1 call per graph, median of 3 x 3 replays", "cases": []}
    t0 = time.perf_counter()
    for case in a.cases.split(","):
        out_f, in_f, tokens = (int(v) for v in case.split("x"))
        w = mask_24(torch.randn(out_f, in_f, dtype=dt, device="cuda"))
        x = torch.randn(tokens, in_f, dtype=dt, device="cuda")
        p = torch._cslt_compress(w)
        row = {"out": out_f, "in": in_f, "tokens": tokens,
               "dense_ms": 1e3 * graph_time(lambda: F.linear(x, w), 10), "algs": {}}
        for alg in range(a.algs):
            fn = lambda: torch._cslt_sparse_mm(p, x.t(), transpose_result=True, alg_id=alg)  # noqa: E731
            try:
                row["algs"][alg] = 1e3 * graph_time(fn, 1)
            except RuntimeError as exc:
                row["algs"][alg] = str(exc).splitlines()[0][:160]
        ok = {k: v for k, v in row["algs"].items() if isinstance(v, float)}
        if ok:
            best = min(ok, key=ok.get)
            row["best_alg"], row["best_ms"], row["speedup_best"] = best, ok[best], row["dense_ms"] / ok[best]
            for alg in sorted({0, best}):
                fn = lambda: torch._cslt_sparse_mm(p, x.t(), transpose_result=True, alg_id=alg)  # noqa: E731
                row[f"eager_call_ms_alg{alg}"] = 1e3 * timeit(fn, 2, warmup=1)
        row["dense_eager_ms"] = 1e3 * timeit(lambda: F.linear(x, w), 10)
        print(json.dumps({k: v for k, v in row.items() if k != "algs"}), flush=True)
        result["cases"].append(row)
        result["elapsed_s"] = time.perf_counter() - t0
        a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
