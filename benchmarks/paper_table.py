"""Reproduce the Wanda paper's main table on one model: WikiText-2 perplexity and prune time of
dense, magnitude, Wanda and SparseGPT at 50% unstructured, 4:8 and 2:4.

Small protocol (default): 64 C4 calibration windows x 512 tokens, seed 0; WikiText-2 test at
512 tokens, first 128 non-overlapping windows. Every run starts from the same freshly loaded
weights, the same calibration tokens and the same evaluation windows. Output: JSON (written
after every run, atomically) and a Markdown table on stdout.

    python benchmarks/paper_table.py --out benchmarks/results/paper_table_smollm2.json
    python benchmarks/paper_table.py --skip-eval --out benchmarks/results/prune_time_smollm2.json
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from llmprune import api, data, devices, loading, report
from llmprune.config import Calibration
from llmprune.evaluate import perplexity, windows_of

RUNS = [(m, p) for m in ("magnitude", "wanda", "sparsegpt") for p in ("unstructured", "4:8", "2:4")]


def table(rows: list[dict]) -> str:
    lines = ["| method | pattern | WikiText-2 ppl | prune time (s) | sparsity |", "|---|---|---:|---:|---:|"]
    for r in rows:
        ppl = "-" if r["perplexity"] is None else f"{r['perplexity']:.2f}"
        lines.append(f"| {r['method']} | {r['pattern']} | {ppl} | {r['prune_s']:.1f} | {r['sparsity']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--runs", default=None, help="comma list of method/pattern, e.g. wanda/2:4 (default: all)")
    ap.add_argument("--skip-eval", action="store_true", help="time the pruning only (no perplexity)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    device = devices.resolve_device("auto")
    dtype = devices.resolve_dtype(args.dtype, device)
    ddir = data.data_dir(args.data_dir)
    model, tok, info = loading.load_model(args.model, dtype)
    calib = Calibration("c4", args.nsamples, args.seqlen, args.seed)
    tokens = api.calibration_tokens(model, tok, calib, ddir)
    stream = data.eval_tokens(tok, "wikitext2", args.eval_seqlen, ddir)
    wins = windows_of(stream, args.eval_seqlen, args.eval_windows)
    batch = max(1, 4096 // args.eval_seqlen)
    runs = RUNS if not args.runs else [tuple(r.split("/")) for r in args.runs.split(",")]

    result = {
        "model": info, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "protocol": {"calibration": calib.to_dict(), "eval": {"set": "wikitext2", "seqlen": args.eval_seqlen,
                                                               "windows": int(wins.shape[0]), "sparsity": args.sparsity}},
        "versions": report.versions(), "rows": [],
    }
    t0 = time.perf_counter()
    dense = None if args.skip_eval else perplexity(model, wins, device, batch, desc="dense").perplexity
    result["rows"].append({"method": "dense", "pattern": "-", "perplexity": dense, "prune_s": 0.0,
                           "sparsity": 0.0, "eval_s": time.perf_counter() - t0})
    report.write_json(args.out, result)
    for method, pattern in runs:
        model, _, _ = loading.load_model(args.model, dtype)
        res = api.prune(model, tok, method=method, pattern=pattern, sparsity=args.sparsity, calib_tokens=tokens,
                        device=device)
        t0 = time.perf_counter()
        ppl = None if args.skip_eval else perplexity(model.to(device), wins, device, batch,
                                                     desc=f"{method} {pattern}").perplexity
        result["rows"].append({"method": method, "pattern": str(res.pattern), "perplexity": ppl,
                               "prune_s": res.prune_s, "sparsity": res.sparsity_overall,
                               "eval_s": time.perf_counter() - t0})
        report.write_json(args.out, result)
        print(f"{method} {pattern}: ppl {ppl} prune {res.prune_s:.1f}s", flush=True)
    print(table(result["rows"]))


if __name__ == "__main__":
    main()
