"""ALPS against Wanda, SparseGPT and RIA + channel permutation + least-squares update: WikiText-2 perplexity and
prune time at 50/60/70% unstructured and 2:4, every method on the same calibration tokens and windows.

The README's small CPU protocol: 32 C4 calibration windows x 512 tokens (seed 0); WikiText-2 test, the first 32
windows of 512. Each method runs with its paper's defaults (ALPS: the paper's; RIA unstructured: one threshold per matrix).
Rows are written as they finish; a rerun with the same --out skips them.

    LLMPRUNE_DATA_DIR=... python benchmarks/alps.py --out benchmarks/results/alps_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from llmprune import api, data, devices, loading, report
from llmprune.config import Calibration
from llmprune.evaluate import perplexity, windows_of
from llmprune.patterns import Unstructured

METHODS = [("alps", "alps", {}), ("sparsegpt", "sparsegpt", {}), ("wanda", "wanda", {}),
           ("ria+perm+lsq", "ria", {"permute": True, "update": "lsq"}), ("alps+perm", "alps", {"permute": True}),
           ("owl+alps", "alps", {"layerwise": "owl"})]
CELLS = [("2:4", None), ("unstructured", 0.7), ("unstructured", 0.5), ("unstructured", 0.6)]


def cell_name(pattern: str, sparsity: float | None) -> str:
    return f"{round(100 * sparsity)}%" if pattern == "unstructured" else pattern


def runs():
    for pattern, sparsity in CELLS:
        for label, method, options in METHODS:
            if options.get("permute") and pattern == "unstructured" and method == "alps":
                continue  # no groups to reorder
            if options.get("layerwise") and pattern != "unstructured":
                continue  # per-block sparsities are for unstructured pruning
            if options.get("permute") and pattern == "unstructured":
                # RIA's paper default for unstructured: one threshold per matrix (its --per_outneuron is off)
                options = {**{k: v for k, v in options.items() if k != "permute"}, "scope": "matrix"}
                label = "ria+lsq"
            yield label, method, pattern, sparsity, options


def prune_row(args, tok, tokens, calib, wins, device, dtype, run) -> dict:
    label, method, pattern, sparsity, options = run
    model, _, _ = loading.load_model(args.model, dtype)
    options = dict(options)
    if "scope" in options:  # an explicit comparison scope, whatever the method's default
        pattern = Unstructured(sparsity, options.pop("scope"))
    res = api.prune(model, tok, method=method, pattern=pattern, sparsity=sparsity, calib_tokens=tokens,
                    calibration=calib, device=device, progress=False, **options)
    t0 = time.perf_counter()
    ppl = perplexity(model.to(device), wins, device, max(1, 4096 // args.eval_seqlen), progress=False).perplexity
    return {"label": label, "method": res.method, "pattern": str(res.pattern), "cell": cell_name(run[2], sparsity),
            "perplexity": ppl, "prune_s": res.prune_s, "sparsity": res.sparsity_overall,
            "eval_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), "options": run[4],
            "settings": res.method_settings}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", help="only these rows, as label@cell, comma-separated (e.g. alps+perm@2:4)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = devices.resolve_device("auto")
    dtype = devices.resolve_dtype("float32", device)
    ddir = data.data_dir(None)
    model, tok, info = loading.load_model(args.model, dtype)
    calib = Calibration("c4", args.nsamples, args.seqlen, 0)
    protocol = {"calibration": calib.to_dict(), "eval": {"set": "wikitext2", "seqlen": args.eval_seqlen,
                                                         "windows": args.eval_windows}}
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else None
    if result is not None and (result["protocol"] != protocol or result["model"]["spec"] != args.model):
        raise SystemExit(f"{out} holds another protocol or model; choose another --out")
    tokens = api.calibration_tokens(model, tok, calib, ddir)
    bos = tok.bos_token_id if api.needs_bos(model) else None
    wins = windows_of(data.eval_tokens(tok, "wikitext2", args.eval_seqlen, ddir), args.eval_seqlen,
                      args.eval_windows, bos)
    if result is None:
        dense = perplexity(model.to(device), wins, device, max(1, 4096 // args.eval_seqlen), progress=False).perplexity
        result = {"model": info, "device": str(device), "dtype": "float32", "protocol": protocol,
                  "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                              "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
                  "versions": report.versions(), "command": "python benchmarks/alps.py --out " + args.out,
                  "rows": [{"label": "dense", "cell": "-", "perplexity": dense}]}
        report.write_json(out, result)
    done = {(r["label"], r["cell"]) for r in result["rows"]}
    for run in runs():
        if (run[0], cell_name(run[2], run[3])) in done:
            continue
        if args.rows and f"{run[0]}@{cell_name(run[2], run[3])}" not in args.rows.split(","):
            continue
        row = prune_row(args, tok, tokens, calib, wins, device, dtype, run)
        result["rows"].append(row)
        report.write_json(out, result)
        print(json.dumps({k: row[k] for k in ("label", "cell", "perplexity", "prune_s")}), flush=True)


if __name__ == "__main__":
    main()
