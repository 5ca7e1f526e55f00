"""Mean zero-shot accuracy (lm-evaluation-harness, 0-shot) next to WikiText-2 perplexity, on one model:
dense, magnitude, Wanda and SparseGPT at 50% unstructured and 2:4 (or, with ``--structured``, structured
pruning rows: ``--structured flap+lsq,wanda-sp+none,shortgpt --remove 0.2``), and the time each task takes.

The seven tasks of the Wanda paper (BoolQ, RTE, HellaSwag, WinoGrande, ARC-e, ARC-c, OpenBookQA),
read from the local data directory, first ``--limit`` examples of each (the full sets take hours on a
2-core CPU). Every run starts from freshly loaded weights and the same calibration tokens.
Output: JSON (written after every run, atomically) and a Markdown table on stdout.

    python benchmarks/zero_shot.py --limit 20 --out benchmarks/results/zero_shot_smollm2.json
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
from llmprune.zeroshot import PAPER_TASKS, ZeroShotSettings, evaluate_zero_shot, harness_version, task_manager

RUNS = [(m, p) for m in ("wanda", "magnitude", "sparsegpt") for p in ("unstructured", "2:4")]


def table(rows: list[dict], tasks) -> str:
    lines = ["| method | pattern | " + " | ".join(tasks) + " | mean acc | WikiText-2 ppl |",
             "|---|---|" + "---:|" * (len(tasks) + 2)]
    for r in rows:
        accs = " | ".join(f"{100 * r['zero_shot'][t]['acc']:.1f}" for t in tasks)
        lines.append(f"| {r['method']} | {r['pattern']} | {accs} | {100 * r['mean_acc']:.1f} | {r['perplexity']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default=",".join(PAPER_TASKS))
    ap.add_argument("--limit", type=int, default=20, help="first N examples of each task")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--runs", default=None, help="comma list of method/pattern, e.g. wanda/2:4 (default: all six)")
    ap.add_argument("--structured", default=None,
                    help="structured rows instead: comma list of importance+restore (e.g. flap+lsq) or shortgpt")
    ap.add_argument("--structure", default="mlp,heads", help="--structured: the structures (shortgpt: blocks)")
    ap.add_argument("--remove", type=float, default=0.2, help="--structured: fraction of the decoder removed")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    device = devices.resolve_device("auto")
    dtype = devices.resolve_dtype(args.dtype, device)
    ddir = data.data_dir(args.data_dir)
    settings = ZeroShotSettings(tasks, limit=args.limit)
    manager = task_manager(ddir)
    model, tok, info = loading.load_model(args.model, dtype)
    calib = Calibration("c4", args.nsamples, args.seqlen, args.seed)
    tokens = api.calibration_tokens(model, tok, calib, ddir)
    bos = tok.bos_token_id if api.needs_bos(model) else None  # Gemma: every window starts with BOS, as in `eval`
    wins = windows_of(data.eval_tokens(tok, "wikitext2", args.eval_seqlen, ddir), args.eval_seqlen, args.eval_windows,
                      bos)
    batch = max(1, 4096 // args.eval_seqlen)
    runs = RUNS if not args.runs else [tuple(r.split("/")) for r in args.runs.split(",")]

    result = {
        "model": info, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "protocol": {"calibration": calib.to_dict(),
                     "perplexity": {"set": "wikitext2", "seqlen": args.eval_seqlen, "windows": int(wins.shape[0])},
                     "zero_shot": {"tasks": list(tasks), "limit": args.limit, "num_fewshot": 0, "sparsity": args.sparsity}},
        "versions": {**report.versions(), "lm_eval": harness_version()}, "task_versions": {}, "rows": [],
    }

    done: set[tuple[str, str]] = set()
    if Path(args.out).exists():  # a run cut short continues: rows of the same protocol are kept
        earlier = json.loads(Path(args.out).read_text())
        if _same_protocol(earlier, result):
            result["rows"] = [{"threads": earlier["machine"]["threads"], **r} for r in earlier["rows"]]
            result["task_versions"] = earlier.get("task_versions", {})
            result["protocol"]["zero_shot"].update(earlier["protocol"]["zero_shot"])
            done = {(r["method"], r["pattern"]) for r in result["rows"]}

    def evaluate(method: str, pattern: str, prune_s: float, sparsity: float) -> None:
        t0 = time.perf_counter()
        ppl = perplexity(model.to(device), wins, device, batch, desc=f"{method} {pattern}").perplexity
        ppl_s = time.perf_counter() - t0
        zs = evaluate_zero_shot(model, tok, settings, ddir, label=f"{method} {pattern}", manager=manager)
        result["task_versions"] = {t: v["version"] for t, v in zs["tasks"].items()}
        result["protocol"]["zero_shot"]["batch_size"] = zs["harness"]["batch_size"]
        result["rows"].append({
            "method": method, "pattern": pattern, "sparsity": sparsity, "prune_s": prune_s,
            "perplexity": ppl, "perplexity_s": ppl_s,
            "zero_shot": {t: {k: v[k] for k in ("acc", "acc_norm", "samples", "time_s")} for t, v in zs["tasks"].items()},
            "mean_acc": zs["mean"]["acc"], "mean_acc_norm_or_acc": zs["mean"]["acc_norm_or_acc"],
            "threads": torch.get_num_threads(),
        })
        report.write_json(args.out, result)
        print(f"{method} {pattern}: ppl {ppl:.2f}, mean acc {zs['mean']['acc']:.4f}, "
              f"zero-shot {sum(v['time_s'] for v in zs['tasks'].values()):.0f}s, prune {prune_s:.1f}s", flush=True)

    if ("dense", "-") not in done:
        evaluate("dense", "-", 0.0, 0.0)
    for label in (args.structured.split(",") if args.structured else []):
        structure = "blocks" if label == "shortgpt" else args.structure
        pattern = f"{structure} {round(100 * args.remove)}%"
        if (label, pattern) in done:
            continue
        model, _, _ = loading.load_model(args.model, dtype)
        importance, restore, *flags = ("magnitude+none" if label == "shortgpt" else label + "+none").split("+")
        flags = [f for f in flags if f != "none"]
        res = api.prune_structured(model, tok, structure=structure, remove=args.remove, importance=importance,
                                   restore=restore, objective="post-norm" if "post-norm" in flags else "output",
                                   allocation="adaptive" if "adaptive" in flags else "uniform",
                                   calib_tokens=tokens, calibration=calib, device=device)
        evaluate(label, pattern, res.prune_s, res.removed_fraction)
    for method, pattern in runs if not args.structured else []:
        if (method, pattern) in done:
            continue
        model, _, _ = loading.load_model(args.model, dtype)
        res = api.prune(model, tok, method=method, pattern=pattern, sparsity=args.sparsity, calib_tokens=tokens,
                        calibration=calib, device=device)
        evaluate(method, str(res.pattern), res.prune_s, res.sparsity_overall)
    print(table(result["rows"], tasks))


def _same_protocol(earlier: dict, now: dict) -> bool:
    """Same calibration, perplexity windows, tasks, limit and sparsity (the batch size is filled in later)."""
    a, b = earlier.get("protocol", {}), now["protocol"]
    zs_keys = ("tasks", "limit", "num_fewshot", "sparsity")
    return (a.get("calibration") == b["calibration"] and a.get("perplexity") == b["perplexity"]
            and all(a.get("zero_shot", {}).get(k) == b["zero_shot"][k] for k in zs_keys)
            and earlier.get("model", {}).get("spec") == now["model"].get("spec"))


if __name__ == "__main__":
    main()
