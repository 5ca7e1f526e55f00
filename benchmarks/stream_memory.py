"""Peak CPU memory of `llmprune prune` with the model in memory vs streamed from its safetensors files
(--stream-from-disk), each in its own process, on a Llama-shaped model with random fp32 weights; the
two saved outputs must be identical.

    python benchmarks/stream_memory.py --out benchmarks/results/stream_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from cli_e2e import run_cli  # the same subprocess watcher as the end-to-end benchmark (wait4 peak + polled RSS)
from llmprune import report


def _word_tokenizer(size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def main():
    ap = argparse.ArgumentParser()
    # ~2.7 GB of fp32 blocks: large against the ~0.7 GB that importing torch and transformers takes, so the
    # peaks can show a difference (a 250 MB model's peak was the import's)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=4096)  # small, so that the blocks are most of the model
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--nsamples", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=64)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="stream_memory_"))
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 128,
                      num_key_value_heads=args.hidden // 128, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    model.save_pretrained(work / "src", max_shard_size="200MB")
    del model
    _word_tokenizer(args.vocab).save_pretrained(work / "src")  # the in-memory path loads a tokenizer
    np.save(work / "tokens.npy", np.random.default_rng(0).integers(0, args.vocab, (args.nsamples, args.seqlen)))
    rows = []
    for streamed in (False, True):
        name = "streamed" if streamed else "in_memory"
        command = [sys.executable, "-m", "llmprune", "prune", "--model", str(work / "src"), "--eval", "",
                   "--calib-tokens", str(work / "tokens.npy"), "--device", "cpu", "--dtype", "float32",
                   "--out", str(work / name), "--report", str(work / f"{name}.json"), "--no-progress"]
        command += ["--stream-from-disk"] if streamed else []
        run = run_cli(command, dict(os.environ))
        assert run["rc"] == 0, run["output_tail"]
        rep = json.loads((work / f"{name}.json").read_text())
        rows.append({"run": name, "peak_rss_bytes": run["peak_rss_bytes"], "polled_rss_max_bytes": run["polled_rss_max_bytes"],
                     "rss_samples": run["rss_samples"], "prune_s": rep["time"]["prune_s"],
                     "load_s": rep["time"]["load_s"], "command": "python " + shlex.join(command[1:])})
        print(rows[-1], flush=True)

    def weights(name):
        out = {}
        for f in (work / name).glob("*.safetensors"):
            out.update(load_file(f))
        return out

    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at the parent's resident size when it forks
    probe = ("import torch, transformers, safetensors, accelerate; import llmprune.cli, llmprune.api, "
             "llmprune.streaming; from transformers import LlamaForCausalLM; "
             "print(int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024)")
    baseline = int(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout)
    a, b = weights("in_memory"), weights("streamed")
    identical = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    report.write_json(args.out, {
        "command": " ".join(sys.argv), "machine": platform.machine(), "threads": torch.get_num_threads(),
        "versions": report.versions(), "model_bytes": model_bytes, "block_bytes": block_bytes, "vocab": args.vocab, "layers": args.layers, "hidden": args.hidden,
        "intermediate": args.intermediate, "calibration": [args.nsamples, args.seqlen], "runs": rows,
        "import_baseline_rss_bytes": baseline,
        "outputs_identical": identical})
    print("identical:", identical)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
