"""Wanda on SmolLM2, llmprune vs llm-compressor, side by side on the same CPU and the same tokens.

llm-compressor lives in its own venv (it pins other transformers versions); this script runs it
as a subprocess (benchmarks/llmcompressor_wanda.py), interleaved with llmprune's in-process runs,
then compares the keep-masks layer by layer. Only the pruning call is timed in both.

    /work/llmc-venv/bin/pip install torch==2.13.0 llmcompressor   # once, in its own venv
    python benchmarks/vs_llmcompressor.py --llmc-python /work/llmc-venv/bin/python \
        --out benchmarks/results/vs_llmcompressor_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from llmprune import api, data, devices, loading, report
from llmprune.config import Calibration
from llmprune.models import find_decoder, prunable_layers, weight_matrix

HERE = Path(__file__).resolve().parent


def llmprune_run(model_spec, tokens):
    model, tok, _ = loading.load_model(model_spec, torch.float32, progress=False)
    res = api.prune(model, tok, method="wanda", pattern="unstructured", sparsity=0.5, calib_tokens=tokens,
                    device=torch.device("cpu"), batch_size=8, progress=False)
    _, blocks = find_decoder(model)
    prefix = {id(b): f"model.layers.{i}" for i, b in enumerate(blocks)}
    masks = {f"{prefix[id(b)]}.{n}": weight_matrix(m) != 0 for b in blocks for n, m in prunable_layers(b).items()}
    return res.prune_s, masks


def llmc_run(python, model_dir, token_file, out):
    cmd = [python, str(HERE / "llmcompressor_wanda.py"), "--model", str(model_dir), "--tokens", str(token_file),
           "--out", str(out), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    line = [l for l in proc.stdout.splitlines() if l.startswith("{")][-1]
    return json.loads(line), load_file(str(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmc-python", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    devices.tune_cpu_allocator()  # as the llmprune CLI does

    kind, location = loading.resolve_source(args.model)
    model_dir = loading.gguf_to_folder(location) if kind == "gguf" else Path(location)
    model, tok, info = loading.load_model(args.model, torch.float32, progress=False)
    tokens = api.calibration_tokens(model, tok, Calibration("c4", args.nsamples, args.seqlen, 0), data.data_dir())
    del model
    tmp = Path(tempfile.mkdtemp())
    np.save(tmp / "tokens.npy", tokens.numpy())

    ours, theirs, llmc_meta = [], [], None
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        seconds, our_masks = llmprune_run(args.model, tokens)
        ours.append(seconds)
        print(f"llmprune {seconds:.1f}s", flush=True)
        llmc_meta, their_masks = llmc_run(args.llmc_python, model_dir, tmp / "tokens.npy", tmp / "llmc.safetensors")
        theirs.append(llmc_meta["prune_s"])
        print(f"llm-compressor {llmc_meta['prune_s']:.1f}s", flush=True)

    per_layer = {n: float((our_masks[n] == their_masks[n]).float().mean()) for n in our_masks}
    same = sum(int((our_masks[n] == their_masks[n]).sum()) for n in our_masks)
    total = sum(our_masks[n].numel() for n in our_masks)
    result = {
        "model": info, "calibration": {"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0},
        "dtype": "float32", "threads": torch.get_num_threads(),
        "llmprune": {"prune_s": ours, "batch_size": 8, "versions": report.versions()},
        "llmcompressor": {"prune_s": theirs, **{k: llmc_meta[k] for k in ("version", "transformers", "torch", "pipeline")},
                          "batch_size": 1},
        "speedup_min_over_min": min(theirs) / min(ours),
        "mask_agreement": same / total,
        "mask_agreement_worst_layer": min(per_layer.values()),
        "mask_agreement_by_block": [
            float(np.mean([v for n, v in per_layer.items() if n.startswith(f"model.layers.{i}.")]))
            for i in range(len({n.split(".")[2] for n in per_layer}))
        ],
    }
    report.write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("speedup_min_over_min", "mask_agreement", "mask_agreement_worst_layer")}))


if __name__ == "__main__":
    sys.exit(main())
