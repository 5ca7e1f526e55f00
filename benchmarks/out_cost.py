"""What `--out` costs: the same `llmprune prune` without it, with it, and with --stream-from-disk --out, on a
Llama-2-7B-shaped folder (random bf16 weights), each run in its own process; then a run killed with SIGKILL
halfway and resumed, whose output must be bit-identical.

    python benchmarks/out_cost.py --out benchmarks/results/out_cost_h200.json

Reported per run: the report's time (prune_s, save_s), its bytes_written, the bytes the process wrote
through write(2) (``wchar`` of /proc/self/io, read as it exits: every file, log and report), and the
output folder's size. ``OUT_COST_TINY=1`` runs the same logic on a tiny model on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llmprune import report
from llmprune.checkpoint import read_state, work_dir_for
from llmprune.integrity import MANIFEST_NAME, REPORT_NAME

TINY = os.environ.get("OUT_COST_TINY") == "1"
VOCAB = 32000
WRAP = ("import sys\nimport torch\nfrom llmprune import cli\n"
        "if torch.cuda.is_available():\n    torch.empty(1, device='cuda')  # CUDA's allocator up before the peak reset\n"
        "try:\n    cli.main()\nfinally:\n"
        "    sys.stderr.write('\\nWCHAR ' + [l for l in open('/proc/self/io') if l.startswith('wchar')][0])\n")


def _word_tokenizer(size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def build(folder: Path, layers: int) -> None:
    width = (64, 176, 4, 512) if TINY else (4096, 11008, 32, VOCAB)
    cfg = LlamaConfig(vocab_size=width[3], hidden_size=width[0], intermediate_size=width[1], num_hidden_layers=layers,
                      num_attention_heads=width[2], num_key_value_heads=width[2], max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="5GB")
    _word_tokenizer(width[3]).save_pretrained(folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def command(args, src: Path, tokens: Path, rep: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-c", WRAP, "prune", "--model", str(src), "--method", args.method,
            "--calib-tokens", str(tokens), "--batch-size", str(args.batch_size), "--eval", "", "--no-progress",
            "--device", "cpu" if TINY else "cuda", "--dtype", "bfloat16", "--report", str(rep), *extra]


def run(cmd: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    wchar = int(proc.stderr.rpartition("WCHAR wchar:")[2].split()[0])
    return time.perf_counter() - t0, wchar


def measure(args, src, tokens, tmp: Path, name: str, extra: list[str], out: Path | None) -> dict:
    rep = tmp / f"{name}.json"
    wall, wchar = run(command(args, src, tokens, rep, extra))
    r = json.loads(rep.read_text())
    row = {"wall_s": round(wall, 2), **{k: round(v, 2) for k, v in r["time"].items()},
           "bytes_written_report": r.get("bytes_written"), "process_write_bytes": wchar,
           "weights_sha256": r.get("weights_sha256")}
    if out is not None:
        size = folder_bytes(out)
        row.update(output_bytes=size, written_over_output=round(wchar / size, 3),
                   files={k: v["sha256"] for k, v in json.loads((out / MANIFEST_NAME).read_text())["files"].items()
                          if k != REPORT_NAME})
    print(name, {k: v for k, v in row.items() if k != "files"}, flush=True)
    return row


def kill_and_resume(args, src, tokens, tmp: Path, out: Path, after: int) -> dict:
    rep = tmp / "killed.json"
    cmd = command(args, src, tokens, rep, ["--out", str(out)])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    t0 = time.perf_counter()
    while proc.poll() is None and ((read_state(work_dir_for(out)) or {}).get("done", 0) < after):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = (read_state(work_dir_for(out)) or {}).get("done", 0)
    killed = {"killed_after_s": round(time.perf_counter() - t0, 2), "blocks_done_at_kill": done,
              "output_absent_after_kill": not out.exists()}
    row = measure(args, src, tokens, tmp, "resumed", ["--out", str(out)], out)
    row["resumed_from_block"] = json.loads((out / REPORT_NAME).read_text())["resumed_from_block"]
    return {**killed, **row}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--skip", default="", help="comma list of runs to leave out: stream, kill")
    ap.add_argument("--work", default=None, help="folder for the model and outputs (default: a temporary one)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    tmp = Path(args.work or tempfile.mkdtemp(prefix="out-cost-"))
    tmp.mkdir(parents=True, exist_ok=True)
    result = {"what": __doc__.splitlines()[0], "layers": args.layers, "method": args.method,
              "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "batch_size": args.batch_size},
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "versions": report.versions(), "runs": {}}
    try:
        src = tmp / "src"
        t0 = time.perf_counter()
        build(src, args.layers)
        result["model_bytes"] = folder_bytes(src)
        result["build_s"] = round(time.perf_counter() - t0, 1)
        tokens = tmp / "tokens.npy"
        np.save(tokens, np.random.default_rng(0).integers(3, 500, (args.nsamples, args.seqlen)))
        runs = result["runs"]
        runs["no_out"] = measure(args, src, tokens, tmp, "no_out", [], None)
        report.write_json(args.out, result)
        out = tmp / "pruned"
        runs["out"] = measure(args, src, tokens, tmp, "out", ["--out", str(out)], out)
        runs["out"]["cost_over_no_out"] = round(
            (runs["out"]["prune_s"] + runs["out"]["save_s"]) / runs["no_out"]["prune_s"], 3)
        report.write_json(args.out, result)
        if "kill" not in args.skip:
            killed = tmp / "killed"
            runs["kill_resume"] = kill_and_resume(args, src, tokens, tmp, killed, args.layers // 2)
            runs["kill_resume"]["identical"] = runs["kill_resume"]["files"] == runs["out"]["files"]
            shutil.rmtree(killed, ignore_errors=True)
            report.write_json(args.out, result)
        if "stream" not in args.skip:
            shutil.rmtree(out, ignore_errors=True)
            streamed = tmp / "streamed"
            runs["stream"] = measure(args, src, tokens, tmp, "stream", ["--stream-from-disk", "--out", str(streamed)],
                                     streamed)
            runs["stream"]["identical_to_out"] = runs["stream"]["files"] == runs["out"]["files"]
            report.write_json(args.out, result)
    finally:
        if args.work is None:
            shutil.rmtree(tmp, ignore_errors=True)
    for row in result["runs"].values():
        row.pop("files", None)
    report.write_json(args.out, result)


if __name__ == "__main__":
    main()
