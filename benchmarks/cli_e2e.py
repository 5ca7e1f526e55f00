"""The `llmprune prune` command as a user runs it, disk to disk, against floors measured in the same run.

Every row is one `python -m llmprune prune ...` subprocess from a model folder on disk to a saved
folder; its phases (load, calibration data, prune, save) come from the report it writes, its wall
time, peak RSS (``wait4``) and bytes written (``/proc/PID/io``, polled) from the outside. The floors
are measured in the same run, after a warm-up:

* forward floor: two bf16 forward passes of every block over the calibration tokens (statistics and
  propagation, the least any layer-by-layer method must compute), model on the GPU;
* disk floor: reading the model's bytes and writing them once, at the bandwidths measured here.

    python benchmarks/cli_e2e.py model --out benchmarks/results/cli_e2e_h200.json          # 7B shapes, CUDA
    python benchmarks/cli_e2e.py model --runs wanda/unstructured/gpu/out,... --out ...     # a subset
    python benchmarks/cli_e2e.py real --model smollm2-135m --device cpu --out ...           # --out against none
    CLI_E2E_TINY=1 python benchmarks/cli_e2e.py model --device cpu --out /tmp/e2e.json      # dry run on a CPU

Runs are named method/pattern/placement/output[/K]: K processes under torchrun (one GPU each), one without it;
placement ``gpu`` (the whole model on the GPU,
``--weights gpu``), ``auto`` (``--weights auto``, the default), ``offload`` (the model in CPU memory, each block visiting the GPU, ``--weights cpu``)
or ``stream`` (``--stream-from-disk``); output ``out`` (``--out DIR``) or ``none``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

TINY = os.environ.get("CLI_E2E_TINY") == "1"
VOCAB = 32000
DEFAULT_RUNS = (  # auto: the default --weights (the whole model on the GPU where it fits beside the run)
    "wanda/unstructured/auto/none", "wanda/unstructured/auto/out", "wanda/2:4/auto/out",
    "sparsegpt/unstructured/auto/out", "sparsegpt/2:4/auto/out",
    "wanda/unstructured/offload/out", "sparsegpt/2:4/offload/out",
    "wanda/unstructured/stream/out", "sparsegpt/2:4/stream/out",
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def drop_page_cache() -> bool:
    """Ask the kernel to forget every cached file page, libraries included (root only)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def drop_folder_cache(folder: Path) -> bool:
    """Forget the cached pages of one folder's files only, so that the model is read from the disk while the
    Python libraries stay cached (as on a machine that has run Python before); True when every file was dropped."""
    os.sync()
    done = True
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                done = False
            finally:
                os.close(fd)
    return done


STARTUP = ("import time, torch; t = time.perf_counter(); import llmprune.cli, llmprune.api, llmprune.loading, "
           "llmprune.export, llmprune.checkpoint; from transformers import LlamaForCausalLM; "
           "torch.empty(1, device='cuda' if torch.cuda.is_available() else 'cpu')")


def startup_floor() -> dict:
    """A Python process that imports what the prune command imports and starts CUDA, then exits: timed from outside,
    with every cached page dropped first (cold) and then twice more (warm, the faster kept)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    times = {}
    for label in ("cold", "warm", "warm"):
        if label == "cold":
            times["page_cache_dropped"] = drop_page_cache()
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", STARTUP], env=env, check=True)
        seconds = time.perf_counter() - start
        times[f"{label}_s"] = min(seconds, times.get(f"{label}_s", seconds))
    return {**times, "seconds": times["warm_s"], "command": STARTUP}


# ---------------------------------------------------------------- the model folder
def llama_config(layers: int):
    from transformers import LlamaConfig

    width = (64, 176, 4) if TINY else (4096, 11008, 32)
    return LlamaConfig(vocab_size=VOCAB, hidden_size=width[0], intermediate_size=width[1], num_hidden_layers=layers,
                       num_attention_heads=width[2], num_key_value_heads=width[2], max_position_embeddings=4096)


def word_tokenizer():
    """A word-level tokenizer over the model's vocabulary: the folder loads like any other (the runs use token files)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_folder(folder: Path, layers: int) -> None:
    """Random bf16 Llama-2-7B-shaped weights saved as a plain Hugging Face folder (written once, reused)."""
    if (folder / "config.json").is_file():
        return
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(llama_config(layers), dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="4GB")
    word_tokenizer().save_pretrained(tmp)
    os.replace(tmp, folder)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- floors
def read_bandwidth(folder: Path) -> dict:
    cold = drop_folder_cache(folder)
    files = sorted(folder.glob("*.safetensors"))
    total, start = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as fh:
            while chunk := fh.read(1 << 26):
                total += len(chunk)
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "bytes_per_s": total / seconds, "page_cache_dropped": cold}


def write_bandwidth(folder: Path, nbytes: int) -> dict:
    """Write ``nbytes`` in 64 MiB chunks and fsync, as a saved shard is written."""
    path = folder / "bandwidth.tmp"
    chunk = np.random.default_rng(0).integers(0, 255, 1 << 26, dtype=np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as fh:
        written = 0
        while written < nbytes:
            written += fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return {"bytes": written, "seconds": seconds, "bytes_per_s": written / seconds}


@torch.no_grad()
def forward_floor(folder: Path, tokens: torch.Tensor, batch: int, device: torch.device) -> dict:
    """Two plain forward passes of every block over the calibration hidden states, timed after a warm-up."""
    from transformers import AutoModelForCausalLM

    from llmprune.models import find_decoder
    from llmprune.runner import _run_block, capture_block_inputs

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    hidden, calls = capture_block_inputs(model, tokens, batch, device)
    blocks = find_decoder(model)[1]
    first = {s: c[0] for s, c in calls.items()}
    _run_block(blocks[0], list(hidden[:2]), first)  # warm-up: kernels chosen, workspaces allocated
    sync()
    times = []
    for _ in range(2):  # the floor is the faster of two timings
        h = list(hidden)
        sync()
        start = time.perf_counter()
        for index, block in enumerate(blocks):
            block_calls = {s: c[index] for s, c in calls.items()}
            _run_block(block, list(h), block_calls)
            _run_block(block, h, block_calls)
        sync()
        times.append(time.perf_counter() - start)
    del model, hidden, h
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"seconds": min(times), "timings": times, "dtype": str(dtype).replace("torch.", "")}


def measure_floors(folder: Path, work: Path, tokens: torch.Tensor, batch: int, device: torch.device) -> dict:
    floors = {"startup": startup_floor(), "forward": forward_floor(folder, tokens, batch, device)}
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    read = read_bandwidth(folder)
    floors["read"] = {**read, "model_s": weights / read["bytes_per_s"]}
    wr = write_bandwidth(work, min(weights, 4 << 30))
    floors["write"] = {**wr, "model_s": weights / wr["bytes_per_s"]}
    return floors


# ---------------------------------------------------------------- one CLI run, watched from outside
class Watch:
    """Polls a child's resident memory, its peak (VmHWM) and bytes written until it exits (the last
    poll is at most ``every`` seconds before the exit)."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every = pid, every
        self.rss_max = self.write_bytes = self.hwm = 0
        self.samples: list[tuple[float, int]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        start = time.perf_counter()
        while not self._done.is_set():
            try:
                status = Path(f"/proc/{self.pid}/status").read_text().splitlines()
                rss = int(next(l for l in status if l.startswith("VmRSS:")).split()[1]) * 1024
                hwm = int(next(l for l in status if l.startswith("VmHWM:")).split()[1]) * 1024
                io = Path(f"/proc/{self.pid}/io").read_text()
                wb = int(next(l for l in io.splitlines() if l.startswith("write_bytes:")).split()[1])
            except (OSError, StopIteration, ValueError):
                rss, hwm, wb = 0, 0, self.write_bytes
            self.rss_max, self.write_bytes = max(self.rss_max, rss), max(self.write_bytes, wb)
            self.hwm = max(self.hwm, hwm)
            if rss:
                self.samples.append((round(time.perf_counter() - start, 2), rss))
            self._done.wait(self.every)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def cli_command(spec: str, model: str, tokens: Path, out: Path | None, report: Path, batch: int, device: str,
                dtype: str, extra: list[str]) -> list[str]:
    method, pattern, placement, output, *procs = spec.split("/")
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", procs[0]] if procs else []
    cmd = [sys.executable, *launch, "-m", "llmprune", "prune", "--model", model, "--method", method, "--pattern", pattern,
           "--calib-tokens", str(tokens), "--device", device, "--dtype", dtype, "--batch-size", str(batch),
           "--eval", "", "--report", str(report), "--no-progress", *extra]
    if placement == "gpu":
        cmd += ["--weights", "gpu"]
    elif placement == "auto":
        cmd += ["--weights", "auto"]
    elif placement == "offload":
        cmd += ["--weights", "cpu"]
    elif placement == "stream":
        cmd += ["--stream-from-disk"]
    if output == "out":
        cmd += ["--out", str(out)]
    return cmd


def run_cli(cmd: list[str], env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = Watch(proc.pid)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    watch.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    # VmHWM belongs to the process image since its exec; wait4's ru_maxrss also counts the parent's resident
    # memory at fork time (a benchmark that held a model would hide the child's own peak)
    return {"rc": proc.returncode, "wall_s": wall, "peak_rss_bytes": watch.hwm,
            "wait4_maxrss_bytes": usage.ru_maxrss * 1024,
            "polled_rss_max_bytes": watch.rss_max, "polled_write_bytes": watch.write_bytes,
            "rss_samples": watch.samples[:: max(1, len(watch.samples) // 60)], "output_tail": output[-1500:]}


def row_of(spec: str, run: dict, report: dict | None, out: Path | None) -> dict:
    row = {"run": spec, **{k: v for k, v in run.items() if k != "output_tail"}}
    if report is not None:
        row["time"] = report["time"]
        row["bytes_written"] = report.get("bytes_written")
        row["sparsity"] = report["sparsity_overall"]
        row["peak_memory_bytes"] = report["peak_memory_bytes"]
        row["memory_estimate_bytes"] = report.get("memory_estimate_bytes")
        row["resumed_from_block"] = report.get("resumed_from_block")
        row["weights"] = report.get("weights")
    if out is not None and out.is_dir():
        row["output_bytes"] = folder_bytes(out)
    if run["rc"] != 0:
        row["output_tail"] = run["output_tail"]
    return row


def env_for(threads: int | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def ratios(row: dict, floors: dict) -> dict:
    """prune_s against the forward floor; wall against read + two forwards + write."""
    t = row.get("time") or {}
    fwd = floors.get("forward", {}).get("seconds")
    out = {}
    if fwd and "prune_s" in t:
        out["prune_over_forward_floor"] = t["prune_s"] / fwd
    if fwd and "read" in floors:
        total = fwd + floors["read"]["model_s"] + (floors["write"]["model_s"] if row["run"].split("/")[3] == "out" else 0)
        out["wall_over_total_floor"] = row["wall_s"] / total
        out["total_floor_s"] = total
        if "startup" in floors:  # the same with a process's start-up (imports, CUDA) counted in the floor
            out["wall_over_total_floor_with_startup"] = row["wall_s"] / (total + floors["startup"]["seconds"])
        named = sum(v for k, v in t.items() if k.endswith("_s") and isinstance(v, (int, float)))
        out["outside_report_s"] = row["wall_s"] - named  # process exit, seal, and what no phase times
    return out


# ---------------------------------------------------------------- the two parts
def versions() -> dict:
    from llmprune import report

    info = {"versions": report.versions(), "python": sys.version.split()[0], "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return info


def write(path: str, payload: dict) -> None:
    from llmprune import report

    report.write_json(path, payload)


def model_part(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder = work / f"llama7b-{args.layers}"
    t0 = time.perf_counter()
    make_folder(folder, args.layers)
    tokens = torch.randint(0, VOCAB, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    np.save(work / "tokens.npy", tokens.numpy())
    result = json.loads(Path(args.out).read_text()) if args.resume and Path(args.out).is_file() else {}
    result.update({**versions(), "command": " ".join(sys.argv), "model": "Llama-2-7B shapes, random bf16 weights",
                   "layers": args.layers, "calibration": [args.nsamples, args.seqlen], "batch": args.batch,
                   "model_bytes": folder_bytes(folder), "folder_build_s": time.perf_counter() - t0})
    result.setdefault("rows", [])
    if "floors" not in result:  # a resumed run (a second call on the same machine) keeps the floors it measured
        result["floors"] = measure_floors(folder, work, tokens, args.batch, torch.device(args.device))
    floors = result["floors"]
    print(json.dumps({"floors": {k: v.get("seconds") for k, v in floors.items()}}), flush=True)
    write(args.out, result)
    done = {r["run"] for r in result["rows"] if r.get("rc") == 0}
    for spec in (args.runs.split(",") if args.runs else DEFAULT_RUNS):
        if spec in done:
            continue
        out, report = work / "pruned", work / "report.json"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(work / ".pruned.llmprune-work", ignore_errors=True)
        report.unlink(missing_ok=True)
        cold = drop_folder_cache(folder)
        cmd = cli_command(spec, str(folder), work / "tokens.npy", out, report, args.batch, args.device, "bfloat16",
                          [])
        run = run_cli(cmd, env_for(args.threads))
        rep = json.loads(report.read_text()) if report.is_file() else None
        row = row_of(spec, run, rep, out)
        shown = cmd[cmd.index("llmprune") + 1:]
        row.update(page_cache_dropped=cold, command=" ".join(["llmprune", *shown]), processes=int(
            (spec.split("/")[4:] or ["1"])[0]), **ratios(row, floors))
        result["rows"] = [r for r in result["rows"] if r["run"] != spec] + [row]
        print(json.dumps({k: row.get(k) for k in ("run", "rc", "wall_s", "time", "prune_over_forward_floor",
                                                 "wall_over_total_floor", "peak_rss_bytes", "polled_write_bytes",
                                                 "output_bytes")}), flush=True)
        if run["rc"] != 0:
            print(run["output_tail"], flush=True)
        write(args.out, result)
        shutil.rmtree(out, ignore_errors=True)


def real_part(args) -> None:
    """A real model through the CLI: with --out against without, side by side (and perplexity when asked)."""
    work = Path(tempfile.mkdtemp(prefix="cli_e2e_"))
    result = {**versions(), "command": " ".join(sys.argv), "model": args.model, "device": args.device,
              "dtype": args.dtype, "calibration": [args.calib, args.nsamples, args.seqlen], "rows": []}
    base = ["--calib", args.calib, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
            "--eval", args.eval or ""]
    if args.eval:
        base += ["--eval-seqlen", str(args.eval_seqlen or args.seqlen)]
    for repeat in range(args.repeats):
        for spec in args.runs.split(","):  # method/pattern/-/output, then any more flags after a space
            head, _, more = spec.partition(" ")
            method, pattern, _, output = head.split("/")
            out, report = work / "pruned", work / "report.json"
            shutil.rmtree(out, ignore_errors=True)
            report.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "llmprune", "prune", "--model", args.model, "--method", method,
                   "--pattern", pattern, "--device", args.device, "--dtype", args.dtype, "--report", str(report),
                   "--no-progress", *base, *more.split()] + (["--out", str(out)] if output == "out" else [])
            run = run_cli(cmd, env_for(args.threads))
            rep = json.loads(report.read_text()) if report.is_file() else None
            row = row_of(spec, run, rep, out)
            row.update(repeat=repeat, command=" ".join(["llmprune", *cmd[3:]]))
            if rep is not None:
                row["perplexity"] = rep.get("perplexity")
            result["rows"].append(row)
            print(json.dumps({k: row.get(k) for k in ("run", "rc", "wall_s", "time", "perplexity", "output_bytes",
                                                     "polled_write_bytes")}), flush=True)
            if run["rc"] != 0:
                print(run["output_tail"], flush=True)
            write(args.out, result)
    shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["model", "real"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--runs", default=None, help="comma list of method/pattern/placement/output")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the CLI processes")
    ap.add_argument("--layers", type=int, default=2 if TINY else 32)
    ap.add_argument("--nsamples", type=int, default=8 if TINY else 128)
    ap.add_argument("--seqlen", type=int, default=64 if TINY else 2048)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "cli_e2e"))
    ap.add_argument("--resume", action="store_true", help="keep the finished rows of --out and run the rest")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--eval", default="")
    ap.add_argument("--eval-seqlen", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.part == "real" and not args.runs:
        args.runs = "wanda/unstructured/-/none,wanda/unstructured/-/out"
    (model_part if args.part == "model" else real_part)(args)


if __name__ == "__main__":
    main()
