"""WikiText-2 perplexity and prune time of the baselines and of OWL, RIA (+ N:M channel permutation),
the Wanda variant, the least-squares weight update and DSnoT mask refinement, at 50/60/70% unstructured, 4:8 and 2:4.

Reduced protocol for a 2-core CPU (default): 32 C4 calibration windows x 512 tokens, seed 0; WikiText-2
test, 512-token windows, first 32. Hyper-parameters are the papers' defaults, fixed before any run:
OWL M = 5, lambda = 0.08; RIA a = 0.5; update: 1% dampening, 20 conjugate-gradient steps; DSnoT: 50 cycles,
threshold 0.1 (recorded in each row's settings, the protocol predates them). Every run
starts from freshly loaded weights with the same calibration tokens and evaluation windows.

DSnoT and OWL run as their papers' code does (``--dsnot-variant paper``, ``--owl-variant paper``) and, in rows
named "..., llmprune", by this library's earlier rules; RIA's unstructured rows compare over the whole matrix
(its code's default) and, in "ria, row", within each row. Rows recorded before these options existed ran the
llmprune rules; ``relabel`` names them so (``--relabel-only`` rewrites a JSON that way and runs nothing).

Runs go in priority order; the JSON is rewritten after every row, and a rerun with the same --out and
protocol skips the rows already there (so a partial run is usable and can be continued).

    python benchmarks/beyond_wanda.py --out benchmarks/results/beyond_wanda_smollm2.json
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
from llmprune.layerwise import OWL
from llmprune.methods import DSnoT

PAPER_DSNOT = {"refine": "dsnot", "dsnot_variant": "paper"}
OURS_DSNOT = {"refine": "dsnot", "dsnot_variant": "llmprune"}
PAPER_OWL = {"layerwise": "owl", "owl_variant": "paper"}
OURS_OWL = {"layerwise": "owl", "owl_variant": "llmprune"}

# (label, method, pattern, sparsity, options) in priority order
RUNS = [
    ("wanda", "wanda", "unstructured", 0.7, {}),
    ("owl+wanda, llmprune", "wanda", "unstructured", 0.7, OURS_OWL),
    ("wanda", "wanda", "2:4", None, {}),
    ("sparsegpt", "sparsegpt", "2:4", None, {}),
    ("ria+perm+lsq", "ria", "2:4", None, {"permute": True, "update": "lsq"}),
    ("ria+perm", "ria", "2:4", None, {"permute": True}),
    ("wanda+lsq", "wanda", "2:4", None, {"update": "lsq"}),
    ("wanda", "wanda", "unstructured", 0.5, {}),
    ("owl+wanda, llmprune", "wanda", "unstructured", 0.5, OURS_OWL),
    ("wanda", "wanda", "unstructured", 0.6, {}),
    ("owl+wanda, llmprune", "wanda", "unstructured", 0.6, OURS_OWL),
    ("sparsegpt", "sparsegpt", "unstructured", 0.7, {}),
    ("ria", "ria", "2:4", None, {}),
    ("wanda", "wanda", "4:8", None, {}),
    ("ria+perm+lsq", "ria", "4:8", None, {"permute": True, "update": "lsq"}),
    ("sparsegpt", "sparsegpt", "4:8", None, {}),
    ("owl+sparsegpt, llmprune", "sparsegpt", "unstructured", 0.7, OURS_OWL),
    ("sparsegpt", "sparsegpt", "unstructured", 0.5, {}),
    ("sparsegpt", "sparsegpt", "unstructured", 0.6, {}),
    ("ria+perm", "ria", "4:8", None, {"permute": True}),
    ("wanda+dsnot, llmprune", "wanda", "unstructured", 0.7, OURS_DSNOT),
    ("wanda+dsnot, llmprune", "wanda", "2:4", None, OURS_DSNOT),
    ("wanda+dsnot, llmprune", "wanda", "unstructured", 0.5, OURS_DSNOT),
    ("ria+perm+dsnot, llmprune", "ria", "2:4", None, {"permute": True, **OURS_DSNOT}),
    ("wanda+dsnot, llmprune", "wanda", "unstructured", 0.6, OURS_DSNOT),
    ("wanda+dsnot, llmprune", "wanda", "4:8", None, OURS_DSNOT),
    ("owl+wanda+lsq, llmprune", "wanda", "unstructured", 0.7, {**OURS_OWL, "update": "lsq"}),
    ("wanda+lsq", "wanda", "unstructured", 0.7, {"update": "lsq"}),
    ("wanda-variant", "wanda-variant", "unstructured", 0.7, {}),
    ("magnitude", "magnitude", "unstructured", 0.7, {}),
    ("magnitude", "magnitude", "2:4", None, {}),
    ("magnitude", "magnitude", "unstructured", 0.5, {}),
    ("wanda-variant", "wanda-variant", "unstructured", 0.5, {}),
    ("magnitude", "magnitude", "unstructured", 0.6, {}),
    ("magnitude", "magnitude", "4:8", None, {}),
    # the papers' rules (DSnoT, OWL) and RIA's scopes, side by side with the rows above
    ("wanda+dsnot", "wanda", "unstructured", 0.7, PAPER_DSNOT),
    ("owl+wanda", "wanda", "unstructured", 0.7, PAPER_OWL),
    ("wanda+dsnot", "wanda", "2:4", None, PAPER_DSNOT),
    ("ria", "ria", "unstructured", 0.7, {"scope": "matrix"}),
    ("ria, row", "ria", "unstructured", 0.7, {"scope": "row"}),
    ("wanda+dsnot", "wanda", "unstructured", 0.5, PAPER_DSNOT),
    ("owl+wanda", "wanda", "unstructured", 0.5, PAPER_OWL),
    ("ria", "ria", "unstructured", 0.5, {"scope": "matrix"}),
    ("ria, row", "ria", "unstructured", 0.5, {"scope": "row"}),
    ("wanda+dsnot", "wanda", "unstructured", 0.6, PAPER_DSNOT),
    ("owl+wanda", "wanda", "unstructured", 0.6, PAPER_OWL),
    ("ria", "ria", "unstructured", 0.6, {"scope": "matrix"}),
    ("ria, row", "ria", "unstructured", 0.6, {"scope": "row"}),
    ("ria+perm+dsnot", "ria", "2:4", None, {"permute": True, **PAPER_DSNOT}),
    ("wanda+dsnot", "wanda", "4:8", None, PAPER_DSNOT),
    ("owl+sparsegpt", "sparsegpt", "unstructured", 0.7, PAPER_OWL),
    ("owl+wanda+lsq", "wanda", "unstructured", 0.7, {**PAPER_OWL, "update": "lsq"}),
]


def cell(pattern: str, sparsity: float | None) -> str:
    return f"{round(100 * sparsity)}%" if pattern == "unstructured" else pattern


def prune_options(options: dict) -> dict:
    """A row's options (JSON: strings) as ``api.prune`` keywords: the variants become option objects."""
    out = {k: v for k, v in options.items() if k not in ("dsnot_variant", "owl_variant")}
    if "dsnot_variant" in options:
        out["refine"] = DSnoT(variant=options["dsnot_variant"])
    if "owl_variant" in options:
        out["layerwise"] = OWL(variant=options["owl_variant"])
    return out


def relabel(rows: list[dict]) -> int:
    """Rows recorded before ``--dsnot-variant`` / ``--owl-variant`` existed ran the llmprune rules (their settings
    lack the variant): name them "..., llmprune" and record the option that reproduces them. Returns how many."""
    changed = 0
    for row in rows:
        settings, options = row.get("settings", {}), row.get("options", {})
        for key, flag in (("dsnot_variant", "refine"), ("owl_variant", "layerwise")):
            if flag in options and key not in settings and key not in options:
                options[key] = "llmprune"
                if not row["label"].endswith(", llmprune"):
                    row["label"] += ", llmprune"
                changed += 1
    return changed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--eval-batch", type=int, default=None,
                    help="windows per forward in evaluation (default 4096 tokens' worth; lower it for large "
                         "vocabularies, whose logits dominate memory)")
    ap.add_argument("--max-runs", type=int, default=None, help="stop after this many new rows")
    ap.add_argument("--relabel-only", action="store_true", help="name the rows of --out recorded before the "
                    "variant options existed (``relabel``), write it back and run nothing")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.relabel_only:
        result = json.loads(Path(args.out).read_text())
        print(f"{relabel(result['rows'])} rows relabelled")
        report.write_json(Path(args.out), result)
        return

    device = devices.resolve_device("auto")
    dtype = devices.resolve_dtype(args.dtype, device)
    ddir = data.data_dir(args.data_dir)
    model, tok, info = loading.load_model(args.model, dtype)
    calib = Calibration("c4", args.nsamples, args.seqlen, args.seed)
    protocol = {"calibration": calib.to_dict(), "eval": {"set": "wikitext2", "seqlen": args.eval_seqlen,
                                                         "windows": args.eval_windows},
                "hyper_parameters": {"owl_m": 5.0, "owl_lambda": 0.08, "ria_a": 0.5, "update_damp": 0.01,
                                     "update_iters": 20}}
    out = Path(args.out)
    result = None
    if out.is_file():
        result = json.loads(out.read_text())
        if result.get("protocol") != protocol or result["model"]["spec"] != args.model:
            raise SystemExit(f"{out} holds another protocol or model; choose another --out")
        relabel(result["rows"])
    tokens = api.calibration_tokens(model, tok, calib, ddir)
    bos = tok.bos_token_id if api.needs_bos(model) else None
    wins = windows_of(data.eval_tokens(tok, "wikitext2", args.eval_seqlen, ddir), args.eval_seqlen,
                      args.eval_windows, bos)
    batch = args.eval_batch or max(1, 4096 // args.eval_seqlen)
    if result is None:
        result = {"model": info, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                  "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
                  "protocol": protocol, "versions": report.versions(), "rows": []}
        t0 = time.perf_counter()
        dense = perplexity(model, wins, device, batch, desc="dense").perplexity
        result["rows"].append({"label": "dense", "method": "dense", "pattern": "-", "cell": "-",
                               "perplexity": dense, "prune_s": 0.0, "sparsity": 0.0,
                               "eval_s": time.perf_counter() - t0})
        report.write_json(out, result)
    done = {(r["label"], r["cell"]) for r in result["rows"]}
    new = 0
    for label, method, pattern, sparsity, options in RUNS:
        key = (label, cell(pattern, sparsity))
        if key in done:
            continue
        if args.max_runs is not None and new >= args.max_runs:
            break
        model, _, _ = loading.load_model(args.model, dtype)
        res = api.prune(model, tok, method=method, pattern=pattern, sparsity=sparsity, calib_tokens=tokens,
                        calibration=calib, device=device, progress=False, **prune_options(options))
        t0 = time.perf_counter()
        ppl = perplexity(model.to(device), wins, device, batch, progress=False).perplexity
        settings = {k: v for k, v in res.method_settings.items() if k not in ("block_sparsity", "outlier_ratios")}
        row = {"label": label, "method": res.method, "pattern": str(res.pattern), "cell": key[1],
               "perplexity": ppl, "prune_s": res.prune_s, "sparsity": res.sparsity_overall,
               "eval_s": time.perf_counter() - t0, "threads": torch.get_num_threads(), "options": options,
               "settings": settings}
        if "block_sparsity" in res.method_settings:
            row["block_sparsity"] = res.method_settings["block_sparsity"]
            row["outlier_ratios"] = res.method_settings.get("outlier_ratios")
        result["rows"].append(row)
        report.write_json(out, result)
        new += 1
        print(f"{label} {key[1]}: ppl {ppl:.2f} prune {res.prune_s:.1f}s sparsity {res.sparsity_overall:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
