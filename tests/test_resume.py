"""Resume after a crash, Ctrl-C between blocks, numerical guards, determinism notes."""

import json
import os
import signal
import warnings

import pytest
import torch
from typer.testing import CliRunner

import llmprune
from llmprune import UsageError
from llmprune.checkpoint import Checkpoint, work_dir_for
from llmprune.cli import app
from llmprune.devices import deterministic
from llmprune.guards import NumericalError
from llmprune.integrity import MANIFEST_NAME, state_sha256
from llmprune.models import find_decoder

from .conftest import random_tokens, tiny_model

CPU = torch.device("cpu")
TOKENS = random_tokens(5, 24)  # batch size 2: batches of 2, 2, 1 (two call signatures)


class Crash(Exception):
    pass


def crash_after(monkeypatch, block: int, action=None):
    """Make the run die right after block ``block`` is saved (or run ``action`` before that save)."""
    original = Checkpoint.save

    def save(self, index, *args, **kwargs):
        if action is not None and index == block:
            action()
        original(self, index, *args, **kwargs)
        if action is None and index == block:
            raise Crash(f"killed after block {index}")

    monkeypatch.setattr(Checkpoint, "save", save)


def run(work, method="wanda", pattern="unstructured", **kw):
    model = tiny_model("llama", layers=4)
    res = llmprune.prune(model, calib_tokens=TOKENS, method=method, pattern=pattern, device=CPU, batch_size=2,
                         progress=False, checkpoint_dir=work, **kw)
    return model, res


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("sparsegpt", "2:4"), ("magnitude", "1:4")])
@pytest.mark.parametrize("kill_after", [0, 2])
def test_resume_is_bit_identical(tmp_path, monkeypatch, method, pattern, kill_after):
    reference, ref_res = run(None, method, pattern)
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        crash_after(m, kill_after)
        with pytest.raises(Crash):
            run(work, method, pattern)
    assert json.loads((work / "state.json").read_text())["done"] == kill_after + 1
    resumed, res = run(work, method, pattern)
    assert res.resumed_from_block == kill_after + 1
    assert state_sha256(resumed) == state_sha256(reference)
    assert [(r.name, r.zeros) for r in res.layers] == [(r.name, r.zeros) for r in ref_res.layers]


def test_other_settings_are_refused_unless_overwrite(tmp_path, monkeypatch):
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        crash_after(m, 1)
        with pytest.raises(Crash):
            run(work, sparsity=0.5)
    with pytest.raises(UsageError, match=r"other settings \(differs in: sparsity_target\).*pass --overwrite"):
        run(work, sparsity=0.6)
    assert json.loads((work / "state.json").read_text())["done"] == 2  # untouched
    model, res = run(work, sparsity=0.6, overwrite=True)
    assert res.resumed_from_block == 0
    assert state_sha256(model) == state_sha256(run(None, sparsity=0.6)[0])


def test_damaged_progress_is_refused_not_half_used(tmp_path, monkeypatch):
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        crash_after(m, 1)
        with pytest.raises(Crash):
            run(work)
    (work / "block-00001.safetensors").unlink()
    with pytest.raises(UsageError, match=r"saved progress in .* is damaged \(FileNotFoundError.*delete that folder"):
        run(work)


def test_a_finished_checkpoint_resumes_without_recomputing(tmp_path):
    work = tmp_path / "work"
    first, _ = run(work)
    again, res = run(work)
    assert res.resumed_from_block == 4 and state_sha256(again) == state_sha256(first)


def cli_prune(*extra):
    return CliRunner().invoke(app, [str(a) for a in ("prune", *extra)], catch_exceptions=False)


def test_cli_crash_then_same_command_resumes(tiny_folder, tmp_path, monkeypatch, ddir):
    args = ["--model", tiny_folder, "--method", "sparsegpt", "--nsamples", 4, "--seqlen", 16, "--eval", "",
            "--data-dir", ddir, "--no-progress", "--device", "cpu", "--dtype", "float32", "--batch-size", 3]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert cli_prune(*args, "--out", ref).exit_code == 0
    assert not work_dir_for(ref).exists()  # removed once the output is saved
    with monkeypatch.context() as m:
        crash_after(m, 1)
        with pytest.raises(Crash):
            cli_prune(*args, "--out", out)
    assert not out.exists() and work_dir_for(out).is_dir()
    res = cli_prune(*args, "--out", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "llmprune_report.json").read_text())
    ref_report = json.loads((ref / "llmprune_report.json").read_text())
    assert report["resumed_from_block"] == 2 and ref_report["resumed_from_block"] == 0
    assert report["weights_sha256"] == ref_report["weights_sha256"]
    assert report["determinism"]["deterministic"] is True
    hashes = [json.loads((d / MANIFEST_NAME).read_text())["files"]["model.safetensors"] for d in (out, ref)]
    assert hashes[0] == hashes[1]
    assert not work_dir_for(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_ctrl_c_stops_between_blocks_and_says_how_to_resume(tiny_folder, tmp_path, monkeypatch, ddir):
    args = ["--model", tiny_folder, "--nsamples", 4, "--seqlen", 16, "--eval", "", "--data-dir", ddir,
            "--no-progress", "--device", "cpu", "--dtype", "float32", "--out", tmp_path / "out"]
    with monkeypatch.context() as m:
        crash_after(m, 0, action=lambda: os.kill(os.getpid(), signal.SIGINT))
        res = cli_prune(*args)
    assert res.exit_code == 130, res.output
    assert "blocks 0-0 of 3 are finished" in res.output and "run the same command again" in res.output
    assert not (tmp_path / "out").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    res = cli_prune(*args)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "llmprune_report.json").read_text())["resumed_from_block"] == 1


def test_nan_is_named_at_its_block_and_nothing_is_kept(tmp_path):
    model = tiny_model("llama", layers=4)
    _, blocks = find_decoder(model)
    with torch.no_grad():
        blocks[2].post_attention_layernorm.weight[0] = float("inf")
    work = tmp_path / "work"
    with pytest.raises(NumericalError, match=r"Inf in the input statistics of model\.layers\.2\.mlp\.gate_proj \(block 2\) "
                                             r"\(dtype float32\)"):
        llmprune.prune(model, calib_tokens=TOKENS, device=CPU, progress=False, checkpoint_dir=work)
    assert not work.exists()


def test_nan_in_fp16_advises_bf16():
    model = tiny_model("llama", layers=2)
    _, blocks = find_decoder(model)
    model.half()
    with torch.no_grad():
        blocks[0].post_attention_layernorm.weight.fill_(1e4)  # fine in fp16, but gate * up overflows it
    with pytest.raises(NumericalError, match=r"Inf in the input statistics of model\.layers\.0\.mlp\.down_proj "
                                             r"\(block 0\) \(dtype float16\); .* --dtype bfloat16"):
        llmprune.prune(model, calib_tokens=TOKENS, device=CPU, progress=False)


def test_cuda_determinism_is_requested_and_exceptions_reported():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic(torch.device("cuda")) as info:
        assert torch.are_deterministic_algorithms_enabled()
        warnings.warn("scatter_add_cuda_kernel does not have a deterministic implementation, but you set ...")
    assert info["deterministic"] is False and info["nondeterministic"][0].startswith("scatter_add_cuda_kernel")
    assert torch.are_deterministic_algorithms_enabled() == before
    with deterministic(CPU) as info:
        pass
    assert info["deterministic"] is True and info["cpu_threads"] == torch.get_num_threads()
