"""Print the README's result tables (Markdown) from the committed benchmark JSON files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def paper_table(path: Path) -> str:
    r = json.loads(path.read_text())
    cal, ev = r["protocol"]["calibration"], r["protocol"]["eval"]
    head = (f"{r['model']['spec']} on {r['device']} ({r['machine']['threads']} threads), {r['dtype']}; calibration "
            f"{cal['nsamples']} x {cal['seqlen']} C4 tokens, seed {cal['seed']}; WikiText-2 test, "
            f"{ev['seqlen']}-token windows, first {ev['windows']}.\n\n")
    lines = ["| method | 50% unstructured | 4:8 | 2:4 |", "|---|---:|---:|---:|"]
    rows = r["rows"]
    dense = next(x for x in rows if x["method"] == "dense")
    lines.append(f"| dense | {dense['perplexity']:.2f} | | |")
    for method in ("magnitude", "wanda", "sparsegpt"):
        cells = {x["pattern"]: x for x in rows if x["method"] == method}
        if cells:
            ppl = [f"{cells[p]['perplexity']:.2f}" if p in cells else "not run" for p in ("unstructured", "4:8", "2:4")]
            lines.append(f"| {method} | {' | '.join(ppl)} |")
    return head + "\n".join(lines)


def prune_time_table(path: Path) -> str:
    r = json.loads(path.read_text())
    cal = r["protocol"]["calibration"]
    lines = [f"Prune time alone (calibration forward passes + pruning, no evaluation running beside it), "
             f"{r['model']['spec']}, {r['device']} ({r['machine']['threads']} threads), {r['dtype']}, "
             f"{cal['nsamples']} x {cal['seqlen']} calibration tokens:\n",
             "| method | 50% unstructured (s) | 4:8 (s) | 2:4 (s) |", "|---|---:|---:|---:|"]
    for method in ("magnitude", "wanda", "sparsegpt"):
        cells = {x["pattern"]: x for x in r["rows"] if x["method"] == method}
        if cells:
            lines.append(f"| {method} | " + " | ".join(f"{cells[p]['prune_s']:.1f}" if p in cells else "-"
                                                     for p in ("unstructured", "4:8", "2:4")) + " |")
    return "\n".join(lines)


def gpu_table(path: Path) -> str:
    r = json.loads(path.read_text())
    b = r["llama7b"]
    out = [f"{r['gpu']}, torch {r['versions']['torch']}, CUDA {r['cuda']}, transformers {r['versions']['transformers']}; "
           f"Llama-2-7B shapes, random {b['dtype']} weights ({b['model_bytes'] / 2**30:.1f} GiB), calibration "
           f"{b['calibration'][0]} x {b['calibration'][1]} tokens, batch {b['batch']}.\n",
           "| run | time (s) | x floor | peak GPU memory (GiB) |", "|---|---:|---:|---:|",
           f"| floor: two plain forward passes of every block | {b['floor_two_forwards_s']:.1f} | 1.00 | |"]
    for run in r["llama7b_runs"]:
        out.append(f"| {run['method']} {run['pattern']}, {run['placement']} | {run['prune_s']:.1f} | "
                   f"{run['prune_s'] / b['floor_two_forwards_s']:.2f} | {run['peak_gpu_bytes'] / 2**30:.1f} |")
    out += ["", "CPU vs GPU on a small Llama (fp32, same calibration tokens):", "",
            "| method | pattern | masks equal | max abs weight difference |", "|---|---|---:|---:|"]
    for a in r["agreement"]:
        out.append(f"| {a['method']} | {a['pattern']} | {100 * a['mask_agreement']:.2f}% | {a['max_abs_weight_diff']:.3g} |")
    return "\n".join(out)


def llmc_table(path: Path) -> str:
    r = json.loads(path.read_text())
    c = r["calibration"]
    return "\n".join([
        f"Wanda 50% on {r['model']['spec']}, {r['dtype']}, {r['threads']} CPU threads, {c['nsamples']} x {c['seqlen']} "
        f"C4 tokens (the same token ids for both), runs interleaved in one script.\n",
        "| tool | prune time (s), each run | masks equal to llmprune's |", "|---|---|---:|",
        f"| llmprune {r['llmprune']['versions']['llmprune']} (batch {r['llmprune']['batch_size']}) | "
        f"{', '.join(f'{t:.1f}' for t in r['llmprune']['prune_s'])} | - |",
        f"| llm-compressor {r['llmcompressor']['version']} (sequential pipeline, batch {r['llmcompressor']['batch_size']}) | "
        f"{', '.join(f'{t:.1f}' for t in r['llmcompressor']['prune_s'])} | {100 * r['mask_agreement']:.2f}% "
        f"(worst layer {100 * r['mask_agreement_worst_layer']:.1f}%) |",
        f"\nSpeed-up (best run over best run): {r['speedup_min_over_min']:.2f}x.",
    ])


if __name__ == "__main__":
    for name, fn in [("paper_table_smollm2.json", paper_table), ("prune_time_smollm2.json", prune_time_table),
                     ("gpu_check_h200.json", gpu_table),
                     ("vs_llmcompressor_smollm2.json", llmc_table)]:
        if (RESULTS / name).is_file():
            print(f"<!-- {name} -->\n{fn(RESULTS / name)}\n")
        else:
            print(f"<!-- {name}: not present -->\n", file=sys.stderr)
