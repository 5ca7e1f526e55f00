"""Print the README's result tables (Markdown) from the committed benchmark JSON files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def model_name(r: dict) -> str:
    """The alias where a GGUF was carried to another machine under a temporary path, else the spec as given."""
    m = r["model"]
    return f"{m['alias']} (sha256 {m['sha256'][:8]}... at {m['path']})" if m.get("alias") else m["spec"]


def where(r: dict) -> str:
    return r["machine"].get("gpu") or f"{r['machine']['threads']} threads"


def paper_table(path: Path) -> str:
    r = json.loads(path.read_text())
    cal, ev = r["protocol"]["calibration"], r["protocol"]["eval"]
    head = (f"{model_name(r)} on {r['device']} ({where(r)}), {r['dtype']}; calibration "
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


BEYOND_ORDER = ("magnitude", "wanda", "wanda-variant", "owl+wanda", "owl+wanda, llmprune", "sparsegpt",
                "owl+sparsegpt", "owl+sparsegpt, llmprune", "ria", "ria, row", "ria+perm", "wanda+perm", "wanda+lsq",
                "ria+perm+lsq", "owl+wanda+lsq", "owl+wanda+lsq, llmprune", "wanda+dsnot", "wanda+dsnot, llmprune",
                "ria+perm+dsnot", "ria+perm+dsnot, llmprune")


def flags(options: dict) -> str:
    """A row's options as the command line's flags ({"permute": True, "refine": "dsnot"} -> --permute --refine dsnot)."""
    return " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in options.items())
BEYOND_CELLS = ("50%", "60%", "70%", "4:8", "2:4")


def beyond_table(path: Path) -> str:
    r = json.loads(path.read_text())
    cal, ev, hp = r["protocol"]["calibration"], r["protocol"]["eval"], r["protocol"]["hyper_parameters"]
    head = (f"{r['model']['spec']} on {r['device']}, {r['dtype']}; "
            f"calibration {cal['nsamples']} x {cal['seqlen']} C4 tokens, seed {cal['seed']}; WikiText-2 test, "
            f"{ev['seqlen']}-token windows, first {ev['windows']}. Fixed before the run: OWL M = {hp['owl_m']:g}, "
            f"lambda = {hp['owl_lambda']:g}; RIA a = {hp['ria_a']:g}; update dampening {hp['update_damp']:g}, "
            f"{hp['update_iters']} CG steps. Cells: perplexity (prune time in s); - = not run. "
            f"Prune times come from a CPU shared with other jobs, rows run with 1 or 2 threads (recorded per row "
            f"where known): they are not comparable across rows; the \"Prune time (CPU)\" table is.\n\n")
    lines = ["| method | options | " + " | ".join(f"{c} unstructured" if c.endswith("%") else c for c in BEYOND_CELLS)
             + " |", "|---|---|" + "---:|" * len(BEYOND_CELLS)]
    rows = r["rows"]
    dense = next(x for x in rows if x["label"] == "dense")
    lines.append(f"| dense | | {dense['perplexity']:.2f} |" + " |" * (len(BEYOND_CELLS) - 1))
    labels = [x for x in BEYOND_ORDER if any(y["label"] == x for y in rows)]
    labels += [x["label"] for x in rows if x["label"] not in labels and x["label"] != "dense"]
    for label in dict.fromkeys(labels):
        cells = {x["cell"]: x for x in rows if x["label"] == label}
        opts = " / ".join(dict.fromkeys(f"`{f}`" for x in cells.values() if (f := flags(x.get("options", {})))))
        out = [f"{cells[c]['perplexity']:.2f} ({cells[c]['prune_s']:.0f})" if c in cells else "-" for c in BEYOND_CELLS]
        lines.append(f"| {label} | {opts} | " + " | ".join(out) + " |")
    return head + "\n".join(lines) + beyond_targets(rows)


def beyond_targets(rows: list[dict]) -> str:
    """The two targets, read off the rows: the best 2:4 row against Wanda and SparseGPT, OWL's factor at 70%."""
    ppl = {(x["label"], x["cell"]): x["perplexity"] for x in rows}
    out = []
    at24 = {label: p for (label, c), p in ppl.items() if c == "2:4"}
    if at24 and ("wanda", "2:4") in ppl and ("sparsegpt", "2:4") in ppl:
        best = min(at24, key=at24.get)
        met = at24[best] < min(ppl["wanda", "2:4"], ppl["sparsegpt", "2:4"])
        out.append(f"best at 2:4: {best} {at24[best]:.2f} vs wanda {ppl['wanda', '2:4']:.2f} and sparsegpt "
                   f"{ppl['sparsegpt', '2:4']:.2f} ({'beats both' if met else 'does not beat both'})")
    for owl in ("owl+wanda", "owl+wanda, llmprune"):
        if ("wanda", "70%") in ppl and (owl, "70%") in ppl:
            out.append(f"at 70%: wanda / {owl} = {ppl['wanda', '70%'] / ppl[owl, '70%']:.2f}x")
    return ("\n\n" + "; ".join(out) + ".") if out else ""


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


def gpu_scale_table(path: Path) -> str:
    r = json.loads(path.read_text())
    floor = r["floor_two_forwards_s"]
    gib = 2**30
    out = [f"{r['gpu']}, torch {r['versions']['torch']}, CUDA {r['cuda']}, transformers {r['versions']['transformers']}; "
           f"Llama-2-7B shapes with {r['layers']} of its 32 decoder blocks, random {r['dtype']} weights "
           f"({r['model_bytes'] / gib:.1f} GiB), calibration {r['calibration'][0]} x {r['calibration'][1]} tokens, "
           f"batch {r['batch']}.\n",
           "| run | time (s) | x floor | peak GPU memory (GiB) | % of model bytes | estimated before the run (GiB) |",
           "|---|---:|---:|---:|---:|---:|",
           f"| floor: two plain forward passes of every block | {floor:.1f} | 1.00 | | | |"]
    for run in r["runs"]:
        peak = run["peak_gpu_bytes"]
        out.append(f"| {run['method']} {run['pattern']}, {run['placement']} | {run['prune_s']:.1f} | "
                   f"{run['prune_s'] / floor:.2f} | {peak / gib:.2f} | {100 * peak / r['model_bytes']:.0f}% | "
                   f"{run['estimate']['device_bytes'] / gib:.2f} |")
    d = r.get("two_gpus_vs_one")
    if d:
        out += ["", f"2 processes (torchrun, NCCL, one H200 each) against 1, same tokens, {d['layers']} blocks, "
                    f"calibration {d['calibration'][0]} x {d['calibration'][1]}, batch {d['batch']}, model on the GPU:", "",
                "| method | 1 GPU (s) | 2 GPUs (s) | speed-up | layers with identical masks | bitwise identical weights "
                "| max abs weight difference (block 0) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for x in d["rows"]:
            n = x["layers_compared"]
            out.append(f"| {x['method']} {x['pattern']} | {x['prune_s_1']:.1f} | {x['prune_s_2']:.1f} | "
                       f"{x['speedup']:.2f}x | {x['masks_identical']}/{n} | {x['weights_bitwise_identical']}/{n} | "
                       f"{x['max_abs_weight_diff_first_block']:.3g} |")
    return "\n".join(out)


def stream_memory_table(path: Path) -> str:
    r = json.loads(path.read_text())
    mib, base, block = 2**20, r["import_baseline_rss_bytes"], r.get("block_bytes")
    out = [f"Llama-shaped model, {r['layers']} blocks of width {r['hidden']} / {r['intermediate']}, vocabulary "
           f"{r['vocab']}, random fp32 weights ({r['model_bytes'] / mib:.0f} MiB"
           + (f", {block / mib:.0f} MiB a block" if block else "") + f"), Wanda on the CPU, "
           f"{r['calibration'][0]} x {r['calibration'][1]} tokens, `--out`; each run its own process. Python with torch, "
           f"transformers and llmprune imported holds {base / mib:.0f} MiB before any model.\n",
           "| run | peak resident memory (MiB) | above the import baseline (MiB) |" + (" in blocks |" if block else ""),
           "|---|---:|---:|" + ("---:|" if block else "")]
    for x in r["runs"]:
        above = x["peak_rss_bytes"] - base
        out.append(f"| {x['run'].replace('_', ' ')} | {x['peak_rss_bytes'] / mib:.0f} | {above / mib:.0f} |"
                   + (f" {above / block:.1f} |" if block else ""))
    out.append(f"\nSaved outputs identical: {r['outputs_identical']}.")
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


def _x(num, den) -> str:
    return f"{num / den:.2f}x" if num and den else "-"


def sparse24_table(path: Path) -> str:
    r = json.loads(path.read_text())
    runs = r["model_runs"]
    head = (f"{r['gpu']}, torch {r['versions']['torch']}, CUDA {r['cuda']}, transformers {r['versions']['transformers']}; "
            f"Llama-2-7B shapes, {r['layers']} layers, random {r['dtype']} weights with 2:4 magnitude masks; "
            f"one run: `{r['command']}`. Speed-up = dense time / sparse time (>1 is faster).\n\n")
    out = [head + "Per Linear, GPU time (CUDA-graph replay; the eager column adds host cost: back-to-back calls); "
           "alg = cuSPARSELt's algorithm id from its search:\n",
           "| Linear [out x in] | tokens | alg | dense (ms) | llmprune 2:4 (ms) | speed-up | stock swap speed-up | "
           "llmprune eager speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in r["linears"]:
        d, l, s = row.get("dense_graph_ms"), row.get("llmprune_graph_ms"), row.get("stock_graph_ms")
        out.append(f"| {row['linear']} [{row['out']} x {row['in']}] | {row['tokens']} | {row.get('alg', '-')} | {d:.3f} | "
                   f"{l:.3f} | {_x(d, l)} | {_x(d, s)} | {_x(row.get('dense_eager_ms'), row.get('llmprune_eager_ms'))} |")
    out += ["", "Whole model. Prefill: eager = plain PyTorch calls, graph = the forward captured once as a CUDA graph "
            "and replayed. Decode: one step of batch tokens after a 128-token prompt; eager = transformers' dynamic "
            "cache, plain calls (host-bound); graph = static cache, each step one CUDA-graph replay (dense, llmprune "
            "and stock each captured the same way):\n",
            "| run | dense (ms) | llmprune 2:4 (ms) | speed-up | stock swap (ms) | speed-up |", "|---|---:|---:|---:|---:|---:|"]
    for i, row in enumerate(runs["dense"]["rows"]):
        for mode in ("eager", "graph"):
            if f"{mode}_ms" not in row:
                continue
            label = (f"prefill {row['batch']} x {row['seqlen']}, {mode}" if row["kind"] == "prefill"
                     else f"decode, batch {row['batch']}, " + ("eager, dynamic cache" if mode == "eager"
                                                               else "CUDA graph, static cache"))
            d = row.get(f"{mode}_ms")
            lr, sr = runs["llmprune"]["rows"][i], runs["stock"]["rows"][i]
            l, s = lr.get(f"{mode}_ms"), sr.get(f"{mode}_ms")
            s_cell = f"{s:.1f}" if s else f"fails: {sr.get(f'{mode}_error', '')[:60]}"
            out.append(f"| {label} | {d:.1f} | {l:.1f} | {_x(d, l)} | {s_cell} | {_x(d, s)} |")
    chk = runs["llmprune"]
    out += ["", f"Logits of a 2 x 64-token input against the dense pruned model (max |logit| "
            f"{chk['check_all_sparse']['ref_max_abs']:.2f}): llmprune with the sparse kernel in every Linear, max abs "
            f"difference {chk['check_all_sparse']['max_abs_diff']:.3f}, argmax agreement "
            f"{100 * chk['check_all_sparse']['argmax_agreement']:.1f}%; with its plan (dense at 128 tokens) "
            f"{chk['check']['max_abs_diff']:.3f}; stock swap "
            f"{runs['stock']['check']['max_abs_diff']:.3f}, {100 * runs['stock']['check']['argmax_agreement']:.1f}%."]
    dc = chk.get("decode_check")
    if dc:
        out.append(f"Greedy decode, batch 2, {dc['steps']} tokens: the CUDA-graph decode gives the same tokens as the same "
                   f"static-cache step run eagerly ({'yes' if dc['graph_equals_eager_static'] else 'NO'} for llmprune, "
                   f"{'yes' if runs['dense']['decode_check']['graph_equals_eager_static'] else 'NO'} for dense); "
                   f"llmprune's tokens equal dense's at {100 * dc['agreement_with_dense']:.0f}% of positions.")
    return "\n".join(out)


def cslt_fp16_table(path: Path) -> str:
    r = json.loads(path.read_text())
    tokens = sorted({a["tokens"] for a in r["attempts"]})
    out = [f"{r['gpu']}, torch {r['torch']}, CUDA {r['cuda']}, cuSPARSELt {r['cusparselt']}; a {r['shape'][0]} x "
           f"{r['shape'][1]} 2:4 weight, each attempt in its own process (`python benchmarks/cslt_fp16.py`):\n",
           "| float16 call | " + " | ".join(f"{t} tokens" for t in tokens) + " |", "|---|" + "---|" * len(tokens)]

    def cell(a):
        if a is None:
            return "-"
        res = a.get("result")
        if res and "algs" in res:
            good = [int(k) for k, v in res["algs"].items() if v is True]
            bad = {int(k): v for k, v in res["algs"].items() if v is not True}
            first = min(bad) if bad else None
            return (f"ids {min(good)}-{max(good)} correct" + (f"; id {first}: {bad[first][:60]}; later ids fail"
                                                                 if first is not None else ""))
        if res and a["returncode"] == 0:
            extra = f"alg {res['alg']}, " if "alg" in res else ""
            return f"{extra}{'correct' if res['ok'] else 'WRONG'} (rel. err {res['max_rel_err']:.1e})"
        err = (a.get("error") or "").splitlines()[-1]
        if "when calling `" in err:  # the C++ call in full is long: its name is enough
            err = err.split("(")[0] + "(...)`"
        return "fails: " + err[:120].replace("|", "/")

    for name in dict.fromkeys(a["attempt"] for a in r["attempts"] if a["dtype"] == "float16"):
        cells = [cell(next((a for a in r["attempts"] if a["dtype"] == "float16" and a["attempt"] == name
                            and a["tokens"] == t), None)) for t in tokens]
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    bf = [a for a in r["attempts"] if a["dtype"] == "bfloat16" and "search" in a["attempt"]]
    out.append("\nThe same searches in bfloat16: " + "; ".join(f"{a['attempt']} at {a['tokens']} tokens: {cell(a)}"
                                                         for a in bf) + ".")
    return "\n".join(out)


def cslt_fp16_algs_table(path: Path) -> str:
    r = json.loads(path.read_text())
    out = [f"float16 by hand, {r['gpu']}, torch {r['torch']}: every algorithm id 0-35 timed as CUDA-graph replay "
           "(`python benchmarks/cslt_fp16_algs.py`):\n",
           "| Linear [out x in] | tokens | dense (ms) | best id | 2:4 best (ms) | speed-up | one eager 2:4 call (ms) | "
           "one eager dense call (ms) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in r["cases"]:
        eager = c[f"eager_call_ms_alg{c['best_alg']}"]
        out.append(f"| [{c['out']} x {c['in']}] | {c['tokens']} | {c['dense_ms']:.3f} | {c['best_alg']} | "
                   f"{c['best_ms']:.3f} | {_x(c['dense_ms'], c['best_ms'])} | {eager:.0f} | {c['dense_eager_ms']:.3f} |")
    return "\n".join(out)


def storage_table(path: Path) -> str:
    r = json.loads(path.read_text())
    out = [f"{r['model']}, {r['method']} pruning, `--format dense` vs `--format compressed` (weights file only):\n",
           "| dtype | pattern | dense file (MiB) | compressed file (MiB) | pruned Linears: stored / dense | bit-exact reload |",
           "|---|---|---:|---:|---:|---|"]
    for x in r["rows"]:
        out.append(f"| {x['dtype']} | {x['pattern'] if x['pattern'] != 'unstructured' else '50% unstructured'} | "
                   f"{x['dense_file_bytes'] / 2**20:.1f} | {x['compressed_file_bytes'] / 2**20:.1f} | "
                   f"{x['linear_ratio']:.4f} | {'yes' if x['bit_exact'] else 'NO'} |")
    return "\n".join(out)


def kill_resume_table(path: Path) -> str:
    r = json.loads(path.read_text())
    c = r["calibration"]
    lines = [f"{r['model']}, {r['device']} ({r['cpu_threads']} thread), {r['dtype']}, {c['nsamples']} x {c['seqlen']} "
             f"C4 calibration tokens; SIGKILL at seeded random moments, then the same command again.\n",
             "| method | uninterrupted (s) | kills | blocks finished at the kills | resumed outputs bit-identical |",
             "|---|---:|---:|---|---:|"]
    for name, m in r["methods"].items():
        same = sum(t["identical"] for t in m["trials"])
        lines.append(f"| {name} | {m['uninterrupted_s']:.0f} | {len(m['trials'])} | "
                     f"{', '.join(str(t['blocks_done_at_kill']) for t in m['trials'])} | {same} / {len(m['trials'])} |")
    return "\n".join(lines)


TASK_NAMES = {"boolq": "BoolQ", "rte": "RTE", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
              "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA", "piqa": "PIQA"}


def zero_shot_table(path: Path) -> str:
    r = json.loads(path.read_text())
    p = r["protocol"]
    zs, cal, ppl = p["zero_shot"], p["calibration"], p["perplexity"]
    tasks = zs["tasks"]
    counts = sorted({x.get("threads", r["machine"]["threads"]) for x in r["rows"]})
    threads = f"{counts[0]} threads" if len(counts) == 1 else f"{'/'.join(map(str, counts))} threads: per row in the JSON"
    head = (f"{r['model']['spec']} on {r['device']} ({threads}), {r['dtype']}; lm-eval "
            f"{r['versions']['lm_eval']}, {zs['num_fewshot']}-shot, **first {zs['limit']} examples of each task** "
            f"(`--limit {zs['limit']}`), accuracy (`acc`) in %; calibration {cal['nsamples']} x {cal['seqlen']} C4 "
            f"tokens, seed {cal['seed']}; WikiText-2 perplexity on the first {ppl['windows']} windows of "
            f"{ppl['seqlen']} tokens.\n\n")
    lines = ["| method | pattern | " + " | ".join(TASK_NAMES.get(t, t) for t in tasks) + " | mean | WikiText-2 ppl |",
             "|---|---|" + "---:|" * (len(tasks) + 2)]
    done = {(x["method"], x["pattern"]): x for x in r["rows"]}
    order = [("dense", "-")] + [(m, pat) for pat in ("unstructured", "2:4") for m in ("magnitude", "wanda", "sparsegpt")]
    order += [key for key in done if key not in order]  # structured rows and any others, in the JSON's order
    for key in order:
        x = done.get(key)
        label = "50% unstructured" if key[1] == "unstructured" else key[1]
        if x is None:
            lines.append(f"| {key[0]} | {label} | " + " | ".join("" for _ in tasks) + " | not run | |")
            continue
        accs = " | ".join(f"{100 * x['zero_shot'][t]['acc']:.0f}" for t in tasks)
        lines.append(f"| {key[0]} | {label} | {accs} | {100 * x['mean_acc']:.1f} | {x['perplexity']:.2f} |")
    n = zs["limit"]
    times = ["", f"Time of each task on this CPU ({n} examples, batch {zs.get('batch_size', '-')}, lm-eval's "
             "loading of the task included), per model evaluated:", "",
             "| task | dense (s) | min - max over the models (s) | s per example (dense) |", "|---|---:|---:|---:|"]
    dense = done.get(("dense", "-"))
    for t in tasks:
        ts = [x["zero_shot"][t]["time_s"] for x in r["rows"]]
        d = dense["zero_shot"][t]["time_s"] if dense else float("nan")
        times.append(f"| {TASK_NAMES.get(t, t)} | {d:.1f} | {min(ts):.1f} - {max(ts):.1f} | {d / n:.2f} |")
    return head + "\n".join(lines + times)


def cli_e2e_real_table(path: Path) -> str:
    """`llmprune prune` with and without --out on a real model, each run its own process, interleaved."""
    r = json.loads(path.read_text())
    cal = r["calibration"]
    ppl = [x for x in r["rows"] if x.get("perplexity")]
    evaluated = (f"WikiText-2 perplexity over all {ppl[0]['perplexity']['wikitext2']['windows']} windows of "
                 f"{ppl[0]['perplexity']['wikitext2']['seqlen']}" if ppl else "no evaluation")
    where = r.get("gpu", f"{r['cpu_threads']} CPU threads") if r["device"] != "cpu" else f"{r['cpu_threads']} CPU threads"
    head = (f"{r['model']} on {r['device']} ({where}), {r['dtype']}; calibration {cal[1]} x {cal[2]} "
            f"{cal[0]} tokens; {evaluated}; runs interleaved, each its own process "
            f"(torch {r['versions']['torch']}).\n\n")
    lines = ["| run | repeat | wall (s) | load (s) | prune (s) | save (s) | hash (s) | written (MB) | output (MB) "
             "| perplexity dense → pruned |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for x in r["rows"]:
        t = x["time"]
        label = "`--out`" if x["run"].endswith("/out") else "no `--out`"
        out = f"{x['output_bytes'] / 1e6:.1f}" if x.get("output_bytes") else "-"
        hashed = f"{t['hash_s']:.2f}" if t.get("hash_s") is not None else "-"
        w = (x.get("perplexity") or {}).get("wikitext2")
        pp = f"{w['dense']:.3f} → {w['pruned']:.3f}" if w else "-"
        lines.append(f"| {x['run'].split('/')[0]} {label} | {x['repeat'] + 1} | {x['wall_s']:.1f} | {t['load_s']:.1f} | "
                     f"{t['prune_s']:.1f} | {t.get('save_s', 0):.2f} | {hashed} | {x['polled_write_bytes'] / 1e6:.1f} | "
                     f"{out} | {pp} |")
    return head + "\n".join(lines)


def cli_e2e_model_table(path: Path) -> str:
    """The 7B-shaped rows of benchmarks/cli_e2e.py: phases, ratios to the same-run floors, memory, bytes."""
    r = json.loads(path.read_text())
    f = r["floors"]
    startup = f" a process's start-up (imports, CUDA) {f['startup']['seconds']:.1f} s," if "startup" in f else ""
    head = (f"{r.get('gpu', 'CPU')}, torch {r['versions']['torch']}; {r['model']}, {r['layers']} blocks, calibration "
            f"{r['calibration'][0]} x {r['calibration'][1]}, batch {r['batch']}. Floors measured in the same run:{startup} two "
            f"forward passes {f['forward']['seconds']:.1f} s, reading the model {f['read']['model_s']:.1f} s, writing it "
            f"{f['write']['model_s']:.1f} s.\n\n")
    placed = any("place_s" in (x.get("time") or {}) for x in r["rows"])
    keys = ("startup_s", *(("cuda_init_s",) if placed else ()), "load_s", *(("place_s",) if placed else ()),
            "prune_s", "save_s", "hash_s")
    lines = ["| run | wall (s) | start-up | " + ("CUDA | " if placed else "") + "load | " + ("place | " if placed else "")
             + "prune | save | hash | prune / forward floor | wall / total floor | peak RSS (GB) | written / output |",
             "|---|" + "---:|" * (len(keys) + 5)]
    for x in r["rows"]:
        t = x.get("time") or {}
        ratio = (f"{x['polled_write_bytes'] / x['output_bytes']:.2f}" if x.get("output_bytes") else "-")
        cells = [f"{t[k]:.1f}" if t.get(k) is not None else "-" for k in keys]
        lines.append(f"| {x['run']} | {x['wall_s']:.1f} | {' | '.join(cells)} | "
                     f"{x.get('prune_over_forward_floor', float('nan')):.2f} | {x.get('wall_over_total_floor', float('nan')):.2f} | "
                     f"{x['peak_rss_bytes'] / 1e9:.1f} | {ratio} |")
    return head + "\n".join(lines)


def alps_table(path: Path) -> str:
    """benchmarks/alps.py: perplexity (prune time) per method and cell, same tokens for every row."""
    r = json.loads(path.read_text())
    cal, ev = r["protocol"]["calibration"], r["protocol"]["eval"]
    cells = ["50%", "60%", "70%", "2:4"]
    dense = next(x["perplexity"] for x in r["rows"] if x["label"] == "dense")
    head = (f"{model_name(r)} on {r['device']} ({where(r)}), {r['dtype']}; calibration "
            f"{cal['nsamples']} x {cal['seqlen']} C4 tokens, seed {cal['seed']}; WikiText-2 test, {ev['seqlen']}-token "
            f"windows, first {ev['windows']}; dense {dense:.2f}. Cells: perplexity (prune time in s); - = not run.\n\n")
    labels = list(dict.fromkeys(x["label"] for x in r["rows"] if x["label"] != "dense"))
    lines = ["| method | " + " | ".join(cells) + " |", "|---|" + "---:|" * len(cells)]
    for label in labels:
        got = {x["cell"]: x for x in r["rows"] if x["label"] == label}
        lines.append(f"| {label} | " + " | ".join(
            f"{got[c]['perplexity']:.1f} ({got[c]['prune_s']:.0f})" if c in got else "-" for c in cells) + " |")
    return head + "\n".join(lines)


def _cli_cell(run: str) -> tuple[str, str]:
    """(label, cell) of a cli_e2e real row: 'alps/2:4/-/none --permute' -> ('alps --permute', '2:4')."""
    head, _, more = run.partition(" ")
    method, pattern = head.split("/")[:2]
    flags = more.split()
    cell = pattern
    if "--sparsity" in flags:
        i = flags.index("--sparsity")
        cell = f"{round(100 * float(flags[i + 1]))}%"
        del flags[i:i + 2]
    return " ".join([method, *flags]), cell


def alps_paper_table(path: Path) -> str:
    """ALPS and the baselines at the paper protocol through the command (cli_e2e real rows): perplexity per cell."""
    r = json.loads(path.read_text())
    cal = r["calibration"]
    rows = [x for x in r["rows"] if x["rc"] == 0]
    w0 = rows[0]["perplexity"]["wikitext2"]
    head = (f"{r['model']} through `llmprune prune` on {r['gpu']} (torch {r['versions']['torch']}), {r['dtype']}; "
            f"calibration {cal[1]} x {cal[2]} {cal[0]} tokens, seed 0; WikiText-2 test, all {w0['windows']} windows of "
            f"{w0['seqlen']}; dense {w0['dense']:.2f}. Cells: perplexity (prune time in s); - = not run.\n\n")
    got = {}
    for x in rows:
        label, cell = _cli_cell(x["run"])
        got.setdefault(label, {})[cell] = x
    cells = [c for c in ("50%", "60%", "70%", "2:4") if any(c in v for v in got.values())]
    lines = ["| command | " + " | ".join(cells) + " |", "|---|" + "---:|" * len(cells)]
    for label, by in got.items():
        lines.append(f"| `--method {label}` | " + " | ".join(
            f"{by[c]['perplexity']['wikitext2']['pruned']:.2f} ({by[c]['time']['prune_s']:.0f})" if c in by else "-"
            for c in cells) + " |")
    base = got.get("sparsegpt", {})
    ratios = []
    for c in cells:
        if c not in base:
            continue
        best = min((v[c]["perplexity"]["wikitext2"]["pruned"], k) for k, v in got.items() if c in v)
        ratios.append(f"{c}: `{best[1]}` {best[0]:.2f} = {best[0] / base[c]['perplexity']['wikitext2']['pruned']:.3f}x "
                      f"SparseGPT")
    return head + "\n".join(lines) + "\n\nBest per cell against SparseGPT: " + "; ".join(ratios) + "."


def perm_gather_table(path: Path) -> str:
    """benchmarks/perm_gather.py: the --permute gather against the 2:4 matmul alone, CUDA-graph replay."""
    r = json.loads(path.read_text())
    head = (f"{r['device']} ({r['dtype']}, torch {r['versions']['torch']}), CUDA-graph replay, {r['reps']} reps; ms per "
            f"call; gather share = gathered / sparse - 1.\n\n")
    lines = ["| Linear (out x in) | tokens | dense | 2:4 | 2:4 with gather | gather share |",
             "|---|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        g = x.get("graph") or x["eager"]
        lines.append(f"| {x['out']} x {x['in']} | {x['tokens']} | {g['dense_ms']:.3f} | {g['sparse_ms']:.3f} | "
                     f"{g['gathered_ms']:.3f} | {100 * g['gather_share']:+.0f}% |")
    return head + "\n".join(lines)


def prune_time_gpu_table(path: Path) -> str:
    """benchmarks/prune_time_gpu.py: per-Linear ALPS against SparseGPT at 7B shapes, and the N:M selection."""
    r = json.loads(path.read_text())
    a = r["alps"]
    head = (f"{r['device']}, torch {r['versions']['torch']}; random weights, Hessians of {a['tokens']} correlated random "
            f"tokens; one call each after a warm-up.\n\n")
    lines = ["| Linear (out x in) | pattern | SparseGPT (s) | ALPS (s) | ALPS / SparseGPT | output error SparseGPT "
             "| output error ALPS |", "|---|---|---:|---:|---:|---:|---:|"]
    for x in a["rows"]:
        lines.append(f"| {x['shape'][0]} x {x['shape'][1]} | {x['pattern']} | {x['sparsegpt_s']:.3f} | {x['alps_s']:.3f} | "
                     f"{x['alps_s'] / x['sparsegpt_s']:.1f}x | {x['sparsegpt_error']:.3f} | {x['alps_error']:.3f} |")
    proj = a["projected_model_s"]
    model = "; ".join(f"{p}: SparseGPT {proj[p + ' sparsegpt']:.0f} s, ALPS {proj[p + ' alps']:.0f} s"
                      for p in dict.fromkeys(k.rsplit(" ", 1)[0] for k in proj))
    sel = ["| Linear (out x in) | 2:4 by stable sort (ms) | 2:4 by comparison ranks (ms) | masks equal |",
           "|---|---:|---:|---|"]
    for x in r.get("select", []):
        sel.append(f"| {x['shape'][0]} x {x['shape'][1]} | {x['nm_sort_ms']:.2f} | {x['nm_rank_ms']:.2f} | "
                   f"{x['masks_equal']} |")
    return (head + "\n".join(lines) + f"\n\n32 blocks of these Linears (4 + 2 + 1 per block), the pruning maths alone: "
            f"{model}.\n\n" + "\n".join(sel))


def structured_table(path: Path) -> str:
    """benchmarks/structured.py ppl: perplexity per importance + restoration and fraction of the decoder removed,
    with the share of the gap between Wanda-sp (no restoration) and dense each row closes."""
    r = json.loads(path.read_text())
    cal, ev = r["protocol"]["calibration"], r["protocol"]["eval"]
    rows = [x for x in r["rows"] if x["label"] != "dense" and "perplexity" in x]
    dense = next(x["perplexity"] for x in r["rows"] if x["label"] == "dense")
    removes = sorted({x["remove"] for x in rows})
    adaptive = any("intermediate_sizes" in x for x in rows)
    allocation = ("uniform widths, or per block in the +adaptive rows (their range in brackets)" if adaptive
                  else "uniform widths")
    head = (f"{model_name(r)} on {r['device']} ({where(r)}), {r['dtype']}; structure "
            f"{r['protocol']['structure']} ({allocation}, MLP width a multiple of {r['protocol']['width_multiple']}); "
            f"calibration {cal['nsamples']} x {cal['seqlen']} C4 tokens, seed {cal['seed']}; WikiText-2 test, "
            f"{ev['seqlen']}-token windows, first {ev['windows']}; dense {dense:.2f}. Cells: perplexity (share of the "
            "Wanda-sp gap closed); - = not run.\n\n")
    base = {x["remove"]: x["perplexity"] for x in rows if x["label"] == "wanda-sp+none"}
    lines = ["| importance + restoration | " + " | ".join(f"{round(100 * v)}%" for v in removes) + " |",
             "|---|" + "---:|" * len(removes)]
    widths = {v: next((x for x in rows if x["remove"] == v and x["structure"] != "blocks"), None) for v in removes}
    lines.append("| widths (intermediate / KV heads / blocks), removed | " + " | ".join(
        "-" if w is None else f"{w['widths']['intermediate_size']} / {w['widths']['num_key_value_heads']} / "
        f"{w['widths']['num_hidden_layers']}, {100 * w['removed_fraction']:.1f}%" for w in widths.values()) + " |")
    for label in dict.fromkeys(x["label"] for x in rows):
        got = {x["remove"]: x for x in rows if x["label"] == label}
        cells = []
        for v in removes:
            if v not in got:
                cells.append("-")
                continue
            ppl, gap = got[v]["perplexity"], base.get(v)
            closed = f" ({100 * (gap - ppl) / (gap - dense):+.0f}%)" if gap is not None and label != "wanda-sp+none" else ""
            extra = (f" [{got[v]['widths']['num_hidden_layers']} blocks, {100 * got[v]['removed_fraction']:.1f}%]"
                     if got[v]["structure"] == "blocks" else "")
            if "intermediate_sizes" in got[v]:
                extra = f" [{min(got[v]['intermediate_sizes'])}-{max(got[v]['intermediate_sizes'])}]"
            cells.append(f"{ppl:.1f}{closed}{extra}")
        name = f"{label} (blocks only)" if label == "shortgpt" else label
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines)


def structured_prune_time_table(path: Path) -> str:
    """benchmarks/structured.py prune: the prune time of each importance + restoration on one model."""
    r = json.loads(path.read_text())
    cal, w = r["calibration"], r["rows"][0]["widths"]
    head = (f"{r['model']} on {r['device']} ({where(r)}), {r['dtype']}; structure {r['structure']}, --remove "
            f"{r['remove']:g} (intermediate {w['intermediate_size']}, KV heads {w['num_key_value_heads']}, "
            f"{w['num_hidden_layers']} blocks); calibration {cal['nsamples']} x {cal['seqlen']} {cal['tokens']} tokens; "
            f"a fresh model per row, prune time as `llmprune.prune_structured` reports it.\n\n")
    first = r["rows"][0]["prune_s"]
    lines = ["| importance + restoration | prune (s) | against the first row |", "|---|---:|---:|"]
    lines += [f"| {x['label']} | {x['prune_s']:.1f} | {x['prune_s'] / first:.2f}x |" for x in r["rows"]]
    return head + "\n".join(lines)


def structured_speed_table(path: Path) -> str:
    """benchmarks/structured.py speed: the saved dense and pruned models in plain transformers, side by side."""
    r = json.loads(path.read_text())
    p, pr = r["protocol"], r["pruned"]
    w = pr["widths"]
    n = r["machine"]["threads"]
    head = (f"{r['model']} on {r['device']} ({r['machine']['gpu'] or r['machine']['cpu']}, {n} "
            f"thread{'s' if n != 1 else ''}), {r['dtype']}; pruned {','.join(pr['settings']['structures'])} with "
            f"{pr['settings']['importance'] or 'ShortGPT block importance'} to "
            f"intermediate {w['intermediate_size']}, {w['num_key_value_heads']} KV heads, {w['num_hidden_layers']} blocks: "
            f"{100 * pr['removed_fraction']:.1f}% of the decoder's parameters, {100 * pr['model_removed_fraction']:.1f}% "
            f"of the model's. Prefill: batch {p['batch']} x {p['prefill']} tokens; decode: {p['steps']} greedy steps "
            f"after a {p['prompt']}-token prompt, KV cache; median of {p['repeats']} interleaved repeats after "
            f"{p['warmup']} warm-up.\n\n")
    cpu = r["device"] == "cpu" and "prefill_tok_cpu_s" in r["speedup"]
    cols = [("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s")]
    if "graph_decode_tok_s" in r["speedup"]:
        cols.append(("graph_decode_tok_s", "decode tokens/s, CUDA graph"))
    if cpu:
        head += f"Load average during the run {r['load_average'][0]:.1f} (a shared machine): CPU-time columns too.\n\n"
        cols += [("prefill_tok_cpu_s", "prefill tokens per CPU s"), ("decode_tok_cpu_s", "decode tokens per CPU s")]
    lines = ["| model | parameters | " + " | ".join(c for _, c in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    params = {"dense": pr["params"]["model_before"], "pruned": pr["params"]["model_after"]}
    for name in ("dense", "pruned"):
        t = r["timings"][name]
        lines.append(f"| {name} | {params[name] / 1e6:.1f} M | " + " | ".join(f"{t[k]:.1f}" for k, _ in cols) + " |")
    sp = r["speedup"]
    lines.append(f"| pruned / dense | {params['pruned'] / params['dense']:.3f} | "
                 + " | ".join(f"{sp[k]:.2f}x" for k, _ in cols) + " |")
    return head + "\n".join(lines)


if __name__ == "__main__":
    for name, fn in [("paper_table_smollm2.json", paper_table), ("prune_time_smollm2.json", prune_time_table),
                     ("gpu_check_h200.json", gpu_table), ("gpu_scale_h200.json", gpu_scale_table),
                     ("stream_memory_cpu.json", stream_memory_table),
                     ("vs_llmcompressor_smollm2.json", llmc_table), ("sparse24_h200_bf16_graphs.json", sparse24_table),
                     ("cslt_fp16_h200.json", cslt_fp16_table), ("cslt_fp16_algs_h200.json", cslt_fp16_algs_table),
                     ("storage_smollm2.json", storage_table), ("kill_resume_smollm2.json", kill_resume_table),
                     ("beyond_wanda_smollm2.json", beyond_table), ("beyond_wanda_gemma3.json", beyond_table),
                     ("zero_shot_smollm2.json", zero_shot_table),
                     ("cli_e2e_smollm2_cpu.json", cli_e2e_real_table), ("cli_e2e_h200.json", cli_e2e_model_table),
                     ("cli_e2e_h200_cuda_side_thread.json", cli_e2e_model_table),
                     ("perm_gather_h200.json", perm_gather_table), ("prune_time_h200.json", prune_time_gpu_table),
                     ("cli_e2e_smollm2_h200.json", cli_e2e_real_table), ("alps_smollm2.json", alps_table),
                     ("structured_smollm2.json", structured_table),
                     ("structured_mlp_smollm2.json", structured_table), ("structured_gemma3.json", structured_table),
                     ("alps_gemma3.json", alps_table), ("alps_gemma3_h200.json", alps_table),
                     ("structured_smollm2_paper_h200.json", structured_table),
                     ("structured_gemma3_h200.json", structured_table),
                     ("structured_gemma3_paper_h200.json", structured_table),
                     ("structured_prune_time_7b_h200.json", structured_prune_time_table),
                     ("zero_shot_gemma3.json", zero_shot_table),
                     ("structured_speed_llama2_7b_h200_blocks.json", structured_speed_table),
                     ("structured_speed_smollm2_cpu.json", structured_speed_table),
                     ("structured_speed_blocks_smollm2_cpu.json", structured_speed_table),
                     ("structured_speed_smollm2_cpu_model20.json", structured_speed_table),
                     ("structured_speed_llama2_7b_h200.json", structured_speed_table),
                     ("structured_speed_llama2_7b_h200_multiple256.json", structured_speed_table),
                     ("alps_smollm2_paper_h200.json", alps_paper_table),
                     ("cli_e2e_alps_h200_8blocks.json", cli_e2e_model_table)]:
        if (RESULTS / name).is_file():
            print(f"<!-- {name} -->\n{fn(RESULTS / name)}\n")
        else:
            print(f"<!-- {name}: not present -->\n", file=sys.stderr)
