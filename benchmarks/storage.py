"""Bytes on disk: dense HF checkpoint vs llmprune's compressed format, on SmolLM2-135M (magnitude pruning).

    python benchmarks/storage.py --out benchmarks/results/storage_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import llmprune
from llmprune import NM, Unstructured
from llmprune.export import save_pruned


def folder_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.glob(pattern))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for pattern in (NM(2, 4), Unstructured(0.5)):
            model, tok, _ = llmprune.load_model(a.model, dtype, progress=False)
            llmprune.prune(model, method="magnitude", pattern=pattern, device=torch.device("cpu"), progress=False)
            with tempfile.TemporaryDirectory() as tmp:
                dense = save_pruned(model, None, Path(tmp) / "dense", {"pattern": str(pattern)})
                t0 = time.perf_counter()
                comp = save_pruned(model, None, Path(tmp) / "comp", {"pattern": str(pattern)}, format="compressed",
                                   pattern=pattern)
                save_s = time.perf_counter() - t0
                t0 = time.perf_counter()
                loaded = llmprune.load(comp)
                load_s = time.perf_counter() - t0
                exact = all(torch.equal(torch.where(x == 0, 0, x).view(torch.uint8), torch.where(y == 0, 0, y).view(torch.uint8))
                            for x, y in zip(model.state_dict().values(), loaded.state_dict().values()))
                st = json.loads((comp / "llmprune_report.json").read_text())["storage"]
                rows.append({"dtype": str(dtype).replace("torch.", ""), "pattern": str(pattern),
                             "dense_file_bytes": folder_bytes(dense, "*.safetensors"),
                             "compressed_file_bytes": folder_bytes(comp, "*.safetensors"),
                             "linear_dense_bytes": st["linear_dense_bytes"], "linear_stored_bytes": st["linear_stored_bytes"],
                             "linear_ratio": st["linear_ratio"], "bit_exact": exact, "save_s": save_s, "load_s": load_s})
                print(rows[-1], flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": a.model, "method": "magnitude", "versions": llmprune.report.versions(),
                                 "command": "python " + " ".join(sys.argv), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
