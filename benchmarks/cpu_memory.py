"""The CPU memory estimate printed before a run against the peak the run reaches, at several calibration sizes.

Each row is `llmprune prune` in its own process on the real SmolLM2 (fp32, CPU, no evaluation); its peak
is VmHWM, polled from outside. What a run adds is its peak minus the peak of the same command with one
calibration window (the loaded model, the libraries), plus that run's own small estimate.

    python benchmarks/cpu_memory.py --out benchmarks/results/cpu_memory_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from cli_e2e import env_for, run_cli, versions, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--sizes", default="1,64,256,1024")
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpu_memory_"))
    result = {**versions(), "command": " ".join(sys.argv), "model": args.model, "method": args.method,
              "seqlen": args.seqlen, "dtype": "float32", "rows": []}
    for n in (int(x) for x in args.sizes.split(",")):
        report = work / f"r{n}.json"
        cmd = [sys.executable, "-m", "llmprune", "prune", "--model", args.model, "--method", args.method,
               "--nsamples", str(n), "--seqlen", str(args.seqlen), "--eval", "", "--device", "cpu",
               "--dtype", "float32", "--report", str(report), "--no-progress"]
        run = run_cli(cmd, env_for(args.threads))
        assert run["rc"] == 0, run["output_tail"]
        rep = json.loads(report.read_text())
        row = {"nsamples": n, "peak_bytes": run["peak_rss_bytes"], "estimate_cpu_bytes": rep["memory_estimate_bytes"]["cpu_bytes"],
               "prune_s": rep["time"]["prune_s"], "rss_samples": run["rss_samples"]}
        result["rows"].append(row)
        base = result["rows"][0]
        row["added_bytes"] = row["peak_bytes"] - base["peak_bytes"] + base["estimate_cpu_bytes"]
        row["added_over_estimate"] = row["added_bytes"] / row["estimate_cpu_bytes"]
        print(json.dumps({k: v for k, v in row.items() if k != "rss_samples"}), flush=True)
        write(args.out, result)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
