"""Kill a real prune with SIGKILL at random moments, resume it, and compare with a run never interrupted.

For each method: one uninterrupted `llmprune prune --out` run (the reference), then ``--kills``
trials. Each trial starts the same command, waits until a chosen number of blocks is finished
(read from ``state.json`` in the run's work folder ``.OUT.llmprune-work``, which holds one
safetensors shard per finished block and becomes the output), waits a further random fraction of a
block's time, sends SIGKILL, checks that no output folder appeared and records the work folder's
files, then runs the same command again to completion (it re-runs only the propagation forward of
the finished blocks) and checks that no hidden sibling (work folder, temporary copy) is left.
The resumed output must be bit-identical to the reference: same sha256 of the weights (recorded
in the report) and of every file except the report. Targets are drawn without replacement from
0..blocks (``blocks`` = killed while saving the output), seeded.

    LLMPRUNE_DATA_DIR=... python benchmarks/kill_resume.py --nsamples 8 --seqlen 128 \
        --kills wanda=10,sparsegpt=2 --out benchmarks/results/kill_resume_smollm2.json

Every run is `--device cpu --dtype float32`, C4 calibration `--nsamples` x `--seqlen` tokens (seed 0),
one CPU thread (OMP_NUM_THREADS=1), no evaluation; the JSON records the sizes used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llmprune import report
from llmprune.checkpoint import work_dir_for
from llmprune.integrity import MANIFEST_NAME, REPORT_NAME

RUNS = {"wanda": "unstructured", "sparsegpt": "2:4"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread: small-op loops crawl on a shared, oversubscribed CPU


def command(args, method: str, pattern: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "llmprune", "prune", "--model", args.model, "--method", method, "--pattern", pattern,
            "--sparsity", "0.5", "--calib", "c4", "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--seed", "0", "--eval", "", "--device", "cpu", "--dtype", "float32", "--no-progress", "--out", str(out)]


def fingerprint(out: Path) -> dict:
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    rep = json.loads((out / REPORT_NAME).read_text())
    return {"weights_sha256": rep["weights_sha256"], "resumed_from_block": rep["resumed_from_block"],
            "files": {k: v["sha256"] for k, v in files.items() if k != REPORT_NAME}}


def blocks_done(out: Path) -> int:
    try:
        return json.loads((work_dir_for(out) / "state.json").read_text())["done"]
    except (OSError, ValueError, KeyError):
        return 0


def run_to_end(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=ENV)
    return time.perf_counter() - t0


def kill_at(cmd: list[str], out: Path, target: int, delay: float, limit_s: float) -> dict:
    """Start ``cmd``; once ``target`` blocks are done wait ``delay`` s and SIGKILL it."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=ENV)
    while blocks_done(out) < target and proc.poll() is None and time.perf_counter() - t0 < limit_s:
        time.sleep(0.01)
    time.sleep(delay)
    finished_first = proc.poll() is not None
    if not finished_first:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    work = work_dir_for(out)
    files = sorted(p.name for p in work.iterdir()) if work.is_dir() else []
    return {"killed_after_s": round(time.perf_counter() - t0, 3), "finished_before_kill": finished_first,
            "blocks_done_at_kill": blocks_done(out), "output_absent_after_kill": not out.exists(),
            "work_files_at_kill": len(files),
            "work_holds_only_shards_and_state": all(f == "state.json" or f.startswith(("model-", ".model-"))
                                                    for f in files)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=30, help="decoder blocks of the model (SmolLM2-135M: 30)")
    ap.add_argument("--kills", default="wanda=10,sparsegpt=3", help="kills per method, e.g. wanda=10,sparsegpt=3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    result = {
        "what": "SIGKILL at random points of `llmprune prune --out`, then the same command again; "
                "the resumed output must be bit-identical to an uninterrupted run",
        "model": args.model, "calibration": {"source": "c4", "nsamples": args.nsamples, "seqlen": args.seqlen,
                                             "seed": 0},
        "device": "cpu", "dtype": "float32", "cpu_threads": 1, "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "versions": report.versions(), "seed": args.seed, "methods": {},
    }
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    try:
        for item in args.kills.split(","):
            method, _, kills = item.partition("=")
            pattern = RUNS[method]
            ref_out = work / f"ref-{method}"
            ref_s = run_to_end(command(args, method, pattern, ref_out))
            ref = fingerprint(ref_out)
            block_s = json.loads((ref_out / REPORT_NAME).read_text())["time"]["prune_s"] / args.blocks
            entry = {"pattern": pattern, "uninterrupted_s": round(ref_s, 2),
                     "weights_sha256": ref["weights_sha256"], "trials": []}
            targets = sorted(rng.sample(range(args.blocks + 1), int(kills)))
            for target in targets:
                out = work / f"{method}-{target}"
                cmd = command(args, method, pattern, out)
                trial = {"target_blocks_done": target}
                trial.update(kill_at(cmd, out, target, rng.uniform(0, block_s), 10 * ref_s))
                if out.exists():  # the run finished before the kill: there is nothing to resume
                    trial["resume_s"] = None
                else:
                    trial["resume_s"] = round(run_to_end(cmd), 2)
                got = fingerprint(out)
                trial["resumed_from_block"] = got["resumed_from_block"]
                trial["weights_sha256"] = got["weights_sha256"]
                trial["identical"] = got["weights_sha256"] == ref["weights_sha256"] and got["files"] == ref["files"]
                trial["work_folder_removed"] = not work_dir_for(out).exists()
                trial["hidden_siblings_left"] = sorted(p.name for p in work.iterdir() if p.name.startswith("."))
                entry["trials"].append(trial)
                print(f"{method} {pattern}: {trial}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            entry["all_identical"] = all(t["identical"] for t in entry["trials"])
            entry["blocks_killed_in"] = sorted({t["blocks_done_at_kill"] for t in entry["trials"]})
            result["methods"][f"{method} {pattern}"] = entry
            report.write_json(args.out, result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ok = all(e["all_identical"] for e in result["methods"].values())
    print(json.dumps({k: (v["all_identical"], v["blocks_killed_in"]) for k, v in result["methods"].items()}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
