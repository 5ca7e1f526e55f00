"""Llama-2-7B-shaped model (random bf16 weights) on H200s: prune time against the two-forward floor,
peak GPU memory with the model in CPU memory, a run under a GPU memory cap smaller than the model,
and 2 processes (torchrun, NCCL) against 1.

    python benchmarks/gpu_scale.py single --layers 32 --out benchmarks/results/gpu_scale_h200.json
    torchrun --nproc-per-node K benchmarks/gpu_scale.py dist --layers 8 --out dist_K.json
    python benchmarks/gpu_scale.py compare dist_1.json dist_2.json --into benchmarks/results/gpu_scale_h200.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import llmprune
from llmprune import NM, Unstructured, distributed, report
from llmprune.devices import resolve_device
from llmprune.models import find_decoder, prunable_layers, weight_matrix
from llmprune.runner import _run_block, capture_block_inputs

VOCAB = 32000


TINY = os.environ.get("GPU_SCALE_TINY") == "1"  # a dry run of the script's logic on a CPU


def llama7b(layers: int, device: str) -> torch.nn.Module:
    width = (64, 176, 4) if TINY else (4096, 11008, 32)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=width[0], intermediate_size=width[1], num_hidden_layers=layers,
                      num_attention_heads=width[2], num_key_value_heads=width[2], max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to(device).eval()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return model


def model_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def tokens_for(args) -> torch.Tensor:
    return torch.randint(0, VOCAB, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def floor_s(model, tokens, batch, device) -> float:
    """Two plain forward passes of every block over the calibration hidden states (statistics, propagation)."""
    hidden, calls = capture_block_inputs(model, tokens, batch, device)
    sync()
    start = time.perf_counter()
    for index, block in enumerate(find_decoder(model)[1]):
        block_calls = {s: c[index] for s, c in calls.items()}
        _run_block(block, list(hidden), block_calls)
        _run_block(block, hidden, block_calls)
    sync()
    return time.perf_counter() - start


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(model, tokens, method, pattern, batch, device, **kw) -> dict:
    gpu = device.type == "cuda"
    if gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    res = llmprune.prune(model, calib_tokens=tokens, method=method, pattern=pattern, device=device, batch_size=batch,
                         progress=False, **kw)
    return {"method": method, "pattern": str(pattern), "prune_s": res.prune_s, "sparsity": res.sparsity_overall,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if gpu else None, "estimate": res.memory_estimate}


def single(args):
    dev = torch.device("cuda:0")
    tokens = tokens_for(args)
    out = {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "versions": report.versions(),
           "command": " ".join(sys.argv), "layers": args.layers, "calibration": [args.nsamples, args.seqlen],
           "batch": args.batch, "dtype": "bfloat16", "runs": []}

    def save(row=None):
        if row is not None:
            out["runs"].append(row)
            print(json.dumps(row), flush=True)
        report.write_json(args.out, out)

    model = llama7b(args.layers, "cuda")
    out["model_bytes"] = model_bytes(model)
    out["floor_two_forwards_s"] = floor_s(model, tokens, args.batch, dev)
    save()
    for method, pattern in [("wanda", Unstructured(0.5)), ("sparsegpt", Unstructured(0.5))]:
        model = llama7b(args.layers, "cuda")
        save({"placement": "model on GPU", **timed(model, tokens, method, pattern, args.batch, dev)})
    del model
    model = llama7b(args.layers, "cpu")
    save({"placement": "model on CPU, activations in pinned CPU memory",
          **timed(model, tokens, "wanda", Unstructured(0.5), args.batch, dev, activations="cpu")})
    del model
    # a GPU memory cap below the model's size: auto placement must choose what fits
    cap = int(args.cap_fraction_of_model * out["model_bytes"])
    model = llama7b(args.layers, "cpu")  # built before the cap is set
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total, 0)
    row = timed(model, tokens, "wanda", Unstructured(0.5), args.batch, dev, activations="auto")
    save({"placement": f"model on CPU, GPU capped at {cap / 2**30:.2f} GiB "
                       f"({args.cap_fraction_of_model:.0%} of the model), activations auto", "cap_bytes": cap, **row})
    del model
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    torch.cuda.empty_cache()
    save({"placement": "streamed from safetensors files, written block by block (CLI, own process)",
          **streamed(args, tokens)})
    model = llama7b(args.layers, "cuda")
    save({"placement": "model on GPU", **timed(model, tokens, "sparsegpt", NM(2, 4), args.batch, dev)})


def streamed(args, tokens) -> dict:
    """`llmprune prune --stream-from-disk` in a fresh process on a saved copy of the model."""
    import shlex
    import subprocess
    import tempfile

    import numpy as np

    work = tempfile.mkdtemp(prefix="gpu_scale_")
    llama7b(args.layers, "cpu").save_pretrained(f"{work}/src", max_shard_size="2GB")
    np.save(f"{work}/tokens.npy", tokens.numpy())
    command = [sys.executable, "-m", "llmprune", "prune", "--model", f"{work}/src", "--stream-from-disk",
               "--eval", "", "--out", f"{work}/pruned", "--calib-tokens", f"{work}/tokens.npy", "--method", "wanda",
               "--batch-size", str(args.batch), "--activations", "cpu", "--report", f"{work}/report.json",
               "--no-progress"]
    subprocess.run(command, check=True)
    rep = json.loads(open(f"{work}/report.json").read())
    return {"method": "wanda", "pattern": "unstructured", "prune_s": rep["time"]["prune_s"],
            "sparsity": rep["sparsity_overall"], "peak_gpu_bytes": rep["peak_memory_bytes"]["gpu"],
            "peak_cpu_rss_bytes": rep["peak_memory_bytes"]["cpu"], "estimate": rep["memory_estimate_bytes"],
            "command": "python " + shlex.join(command[1:])}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()[:16]


def dist_run(args):
    world, spec = distributed.init("auto")
    dev = resolve_device(spec)
    spec = str(dev)
    tokens = tokens_for(args)
    rows = []
    for method, pattern in [("wanda", Unstructured(0.5)), ("sparsegpt", Unstructured(0.5))]:
        model = llama7b(args.layers, spec)
        distributed.barrier(world)
        row = timed(model, tokens, method, pattern, args.batch, dev, world=world)
        _, blocks = find_decoder(model)
        layers = {f"{i}.{n}": weight_matrix(m) for i, b in enumerate(blocks) for n, m in prunable_layers(b).items()}
        row["mask_sha"] = {k: _digest((w != 0).to(torch.uint8)) for k, w in layers.items()}
        row["weight_sha"] = {k: _digest(w) for k, w in layers.items()}
        if world.is_main:
            torch.save({k: w.cpu() for k, w in list(layers.items())[:7]}, args.out + f".{method}.pt")
        rows.append(row)
        del model, layers
    if world.is_main:
        report.write_json(args.out, {"processes": world.size, "layers": args.layers, "runs": rows,
                                     "calibration": [args.nsamples, args.seqlen], "batch": args.batch})
    distributed.finish(world)


def compare(args):
    one, two = (json.load(open(p)) for p in args.files)
    result = {"command": " ".join(sys.argv), "layers": one["layers"], "calibration": one["calibration"],
              "batch": one["batch"], "rows": []}
    for a, b in zip(one["runs"], two["runs"]):
        wa = torch.load(args.files[0] + f".{a['method']}.pt")
        wb = torch.load(args.files[1] + f".{b['method']}.pt")
        diff = max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wa)
        result["rows"].append({
            "method": a["method"], "pattern": a["pattern"], "prune_s_1": a["prune_s"], "prune_s_2": b["prune_s"],
            "speedup": a["prune_s"] / b["prune_s"],
            "masks_identical": sum(a["mask_sha"][k] == b["mask_sha"][k] for k in a["mask_sha"]),
            "weights_bitwise_identical": sum(a["weight_sha"][k] == b["weight_sha"][k] for k in a["weight_sha"]),
            "layers_compared": len(a["mask_sha"]), "max_abs_weight_diff_first_block": diff,
            "peak_gpu_bytes_1": a["peak_gpu_bytes"], "peak_gpu_bytes_2_rank0": b["peak_gpu_bytes"]})
        print(json.dumps(result["rows"][-1]), flush=True)
    full = json.load(open(args.into)) if os.path.exists(args.into) else {}
    full["two_gpus_vs_one"] = result
    report.write_json(args.into, full)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("part", choices=["single", "dist", "compare"])
    ap.add_argument("files", nargs="*")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cap-fraction-of-model", type=float, default=0.3)
    ap.add_argument("--out")
    ap.add_argument("--into")
    args = ap.parse_args()
    {"single": single, "dist": dist_run, "compare": compare}[args.part](args)


if __name__ == "__main__":
    main()
