"""On a CUDA GPU: (1) CPU vs GPU agreement of masks on a small model, (2) prune time of a
Llama-2-7B-shaped model (random bf16 weights) against the floor of two plain forward passes.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_h200.json
"""

from __future__ import annotations

import argparse
import copy
import platform
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import llmprune
from llmprune import NM, Unstructured, report
from llmprune.models import find_decoder, prunable_layers, weight_matrix
from llmprune.runner import _run_block, capture_block_inputs

CPU, GPU = torch.device("cpu"), torch.device("cuda")


def small_model(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def weights(model):
    return {f"{i}.{n}": weight_matrix(m).float().cpu() for i, b in enumerate(find_decoder(model)[1])
            for n, m in prunable_layers(b).items()}


def agreement():
    tokens = torch.randint(0, 1024, (16, 256), generator=torch.Generator().manual_seed(0))
    rows = []
    for method, pattern in [("wanda", Unstructured(0.5)), ("wanda", NM(2, 4)), ("sparsegpt", Unstructured(0.5)),
                            ("sparsegpt", NM(2, 4))]:
        base = small_model()
        on_cpu, on_gpu = copy.deepcopy(base), copy.deepcopy(base)
        llmprune.prune(on_cpu, calib_tokens=tokens, method=method, pattern=pattern, device=CPU, progress=False)
        llmprune.prune(on_gpu, calib_tokens=tokens, method=method, pattern=pattern, device=GPU, progress=False)
        a, b = weights(on_cpu), weights(on_gpu)
        same = sum(int(((a[k] == 0) == (b[k] == 0)).sum()) for k in a)
        total = sum(a[k].numel() for k in a)
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        rows.append({"method": method, "pattern": str(pattern), "mask_agreement": same / total,
                     "max_abs_weight_diff": diff})
        print(rows[-1], flush=True)
    return rows


def llama7b(dtype):
    cfg = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("cuda"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


@torch.no_grad()
def floor_time(model, tokens, batch):
    """Two plain forward passes of every block over the calibration activations."""
    hidden, calls = capture_block_inputs(model, tokens, batch, GPU)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for index, block in enumerate(find_decoder(model)[1]):
        bc = {s: c[index] for s, c in calls.items()}
        h2 = list(hidden)
        _run_block(block, h2, bc)
        _run_block(block, hidden, bc)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def timed_prune(model, tokens, method, pattern, batch, device=GPU):
    torch.cuda.reset_peak_memory_stats()
    res = llmprune.prune(model, calib_tokens=tokens, method=method, pattern=pattern, device=device,
                         batch_size=batch, progress=False)
    return {"method": method, "pattern": str(pattern), "prune_s": res.prune_s,
            "sparsity": res.sparsity_overall, "peak_gpu_bytes": torch.cuda.max_memory_allocated()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = {"gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "host": platform.node(),
           "versions": report.versions(), "agreement": agreement()}
    report.write_json(args.out, out)

    tokens = torch.randint(0, 32000, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    model = llama7b(torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out["llama7b"] = {"calibration": [args.nsamples, args.seqlen], "batch": args.batch, "dtype": "bfloat16",
                      "model_bytes": model_bytes, "floor_two_forwards_s": floor_time(model, tokens, args.batch)}
    print(out["llama7b"], flush=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    runs = []
    for method, pattern in [("wanda", Unstructured(0.5)), ("wanda", NM(2, 4)), ("sparsegpt", Unstructured(0.5))]:
        model.load_state_dict(state)
        runs.append({"placement": "model on GPU", **timed_prune(model, tokens, method, pattern, args.batch)})
        print(runs[-1], flush=True)
        report.write_json(args.out, {**out, "llama7b_runs": runs})
    # model in CPU memory, one block at a time on the GPU
    model.load_state_dict(state)
    del state
    model.to(CPU)
    torch.cuda.empty_cache()
    runs.append({"placement": "model on CPU, blocks streamed", **timed_prune(model, tokens, "wanda", Unstructured(0.5),
                                                                             args.batch)})
    print(runs[-1], flush=True)
    out["llama7b_runs"] = runs
    report.write_json(args.out, out)


if __name__ == "__main__":
    main()
