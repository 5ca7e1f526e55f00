"""2:4 on the GPU: dense vs llmprune's cuSPARSELt path vs torch's stock to_sparse_semi_structured swap.

Llama-2-7B shapes, random weights with 2:4 magnitude masks; per-Linear time over token counts,
prefill (batch x 2048) and decode of the whole model, side by side in one run:

    python benchmarks/sparse24.py --dtype bfloat16 --out benchmarks/results/sparse24_h200_bf16_graphs.json

Decode is timed twice: eager with transformers' dynamic cache, and as one CUDA-graph replay per step over a
static cache (dense and llmprune both captured).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from llmprune import bench


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-2-7b")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--tokens", default="1,16,256,2048,8192,16384")
    p.add_argument("--prefills", default="1x2048,8x2048")
    p.add_argument("--decodes", default="1,32,256")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-linears", action="store_true")
    p.add_argument("--variants", default="dense,llmprune,stock")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv)

    def save(result):
        a.out.write_text(json.dumps({**result, "command": command}, indent=1))

    result = bench.run(
        a.model, getattr(torch, a.dtype), layers=a.layers, tokens=[int(t) for t in a.tokens.split(",")],
        prefills=[tuple(int(v) for v in s.split("x")) for s in a.prefills.split(",") if s],
        decodes=[int(b) for b in a.decodes.split(",") if b], reps=a.reps, linears=not a.no_linears,
        variants=a.variants.split(","), save=save,
    )
    save(result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
