"""Resume after a crash (in memory, streamed, two processes), Ctrl-C between blocks, a full disk,
damaged progress, numerical guards, determinism notes."""

import errno
import json
import os
import signal
import socket
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmprune
from llmprune import UsageError, checkpoint as checkpoint_mod, cli, distributed, export, streaming
from llmprune.checkpoint import Checkpoint, read_state, work_dir_for
from llmprune.cli import app
from llmprune.devices import deterministic
from llmprune.guards import NumericalError
from llmprune.integrity import MANIFEST_NAME, state_sha256
from llmprune.models import find_decoder

from .conftest import random_tokens, tiny_model
from .conftest import linear_weights

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
@pytest.mark.parametrize("kill_after", [0, 1, 2])
def test_resume_is_bit_identical(tmp_path, monkeypatch, method, pattern, kill_after):
    reference, ref_res = run(None, method, pattern)
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        crash_after(m, kill_after)
        with pytest.raises(Crash):
            run(work, method, pattern)
    state = read_state(work)
    assert state["done"] == kill_after + 1  # what was queued before the crash is written
    assert sorted(p.name for p in work.iterdir()) == sorted(["state.json", *state["shards"]])  # no activations
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
    shard = work / "model-block-00001.safetensors"
    blob = bytearray(shard.read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    shard.write_bytes(bytes(blob))
    with pytest.raises(UsageError, match=r"saved progress in .* is damaged \(model-block-00001.safetensors does not "
                                         r"match its sha256 in state.json\); delete that folder"):
        run(work)
    shard.unlink()
    with pytest.raises(UsageError, match=r"saved progress in .* is damaged \(model-block-00001.safetensors is missing"):
        run(work)


def test_stale_files_of_a_kill_are_removed(tmp_path, monkeypatch):
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        crash_after(m, 1)
        with pytest.raises(Crash):
            run(work)
    (work / ".model-block-00002.safetensors.tmp-99999").write_bytes(b"half a file")  # killed while writing
    (work / "model-block-00003.safetensors").write_bytes(b"never committed")
    reference, _ = run(None)
    resumed, res = run(work)
    assert res.resumed_from_block == 2 and state_sha256(resumed) == state_sha256(reference)
    assert sorted(p.name for p in work.iterdir()) == ["model-block-0000%d.safetensors" % i for i in range(4)] + [
        "state.json"]


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
    files = [{k: v for k, v in json.loads((d / MANIFEST_NAME).read_text())["files"].items()
              if k != "llmprune_report.json"} for d in (out, ref)]
    assert files[0] == files[1] and "model-block-00002.safetensors" in files[0]
    assert "resuming from block 2 of 3 (saved progress in" in res.output
    assert not work_dir_for(out).exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_ctrl_c_stops_between_blocks_and_says_how_to_resume(tiny_folder, tmp_path, monkeypatch, ddir):
    args = ["--model", tiny_folder, "--nsamples", 4, "--seqlen", 16, "--eval", "", "--data-dir", ddir,
            "--no-progress", "--device", "cpu", "--dtype", "float32", "--out", tmp_path / "out"]
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN when the suite runs as a background job
    with monkeypatch.context() as m:
        crash_after(m, 0, action=lambda: os.kill(os.getpid(), signal.SIGINT))
        res = cli_prune(*args)
    assert res.exit_code == 130, res.output
    assert "blocks 0-0 of 3 are finished" in res.output and "run the same command again" in res.output
    assert not (tmp_path / "out").exists()
    assert read_state(work_dir_for(tmp_path / "out"))["done"] == 1  # the writer was drained before exiting
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is put back
    res = cli_prune(*args)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out" / "llmprune_report.json").read_text())["resumed_from_block"] == 1


def _streamed(src, work, tokens, **kw):
    model, reader = streaming.open_model(src, torch.float32)
    res = llmprune.prune(model, calib_tokens=tokens, method="sparsegpt", pattern="2:4", device=CPU, batch_size=2,
                         progress=False, placement=streaming.DiskBlocks(model, reader), checkpoint_dir=work, **kw)
    return model, res


def _finished(model, work, out):
    export.seal(export.finish_dense(work, model, None, read_state(work)["shards"]), out, {})
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    return {k: v for k, v in files.items() if k != "llmprune_report.json"}


@pytest.mark.parametrize("kill_after", [0, 1])
def test_streamed_resume_is_bit_identical(tmp_path, monkeypatch, kill_after):
    src = tmp_path / "src"
    tiny_model("llama", layers=3).save_pretrained(src)
    tokens = random_tokens(5, 16)
    ref_model, _ = _streamed(src, tmp_path / "ref-work", tokens)
    ref_files = _finished(ref_model, tmp_path / "ref-work", tmp_path / "ref")
    work = tmp_path / "work"
    with monkeypatch.context() as m:
        crash_after(m, kill_after)
        with pytest.raises(Crash):
            _streamed(src, work, tokens)
    assert read_state(work)["done"] == kill_after + 1
    model, res = _streamed(src, work, tokens)
    assert res.resumed_from_block == kill_after + 1
    assert _finished(model, work, tmp_path / "out") == ref_files  # every shard bit-identical
    in_memory = AutoModelForCausalLM.from_pretrained(src)
    llmprune.prune(in_memory, calib_tokens=tokens, method="sparsegpt", pattern="2:4", device=CPU, batch_size=2,
                   progress=False)
    assert state_sha256(AutoModelForCausalLM.from_pretrained(tmp_path / "out")) == state_sha256(in_memory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank, size, port, work, crash_block, results):
    import torch.distributed as dist

    torch.set_num_threads(1)
    if crash_block is not None:
        original = Checkpoint.save

        def save(self, index, *args, **kwargs):
            original(self, index, *args, **kwargs)
            if index == crash_block:
                raise Crash(f"stopped after block {index}")

        Checkpoint.save = save
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        model = tiny_model("llama", layers=4)
        res = llmprune.prune(model, calib_tokens=TOKENS_7, method="sparsegpt", pattern="2:4", device=CPU, batch_size=2,
                             progress=False, world=distributed.World(rank, size, rank), checkpoint_dir=work)
        results[rank] = (res.resumed_from_block, linear_weights(model))
    except Crash:
        results[rank] = "crashed"
    finally:
        dist.destroy_process_group()


TOKENS_7 = random_tokens(7, 24)  # 4 batches of 2 (the last one short), split 2 + 2


def _two_processes(work, crash_block=None):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(2, _free_port(), work, crash_block, results), nprocs=2, join=True)
        return [results[0], results[1]]


def test_two_processes_resume_bit_identical_to_one(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the GEMM blocking of the spawned processes
    try:
        single = tiny_model("llama", layers=4)
        llmprune.prune(single, calib_tokens=TOKENS_7, method="sparsegpt", pattern="2:4", device=CPU, batch_size=2,
                       progress=False)
    finally:
        torch.set_num_threads(threads)
    want = linear_weights(single)
    work = tmp_path / "work"
    assert _two_processes(work, crash_block=1) == ["crashed", "crashed"]
    assert read_state(work)["done"] == 2
    for resumed_from, got in _two_processes(work):
        assert resumed_from == 2
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_full_disk_while_saving_blocks_is_one_line_and_resumes(tiny_folder, tmp_path, monkeypatch, ddir, capsys):
    argv = ["prune", "--model", str(tiny_folder), "--nsamples", "4", "--seqlen", "16", "--eval", "", "--data-dir",
            str(ddir), "--no-progress", "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path / "out")]
    original = checkpoint_mod.write_shard

    def full(path, tensors):
        if path.name == "model-block-00001.safetensors":
            (path.parent / f".{path.name}.tmp-1").write_bytes(b"half")  # what a real full disk leaves ...
            (path.parent / f".{path.name}.tmp-1").unlink()  # ... and write_bytes_atomic removes
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(path, tensors)

    with monkeypatch.context() as m:
        m.setattr(checkpoint_mod, "write_shard", full)
        code = cli.run(argv)
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: writing ") and "no space left on the device" in lines[0]
    assert "re-run the same command to resume" in lines[0]
    work = work_dir_for(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "tiny-llama") == [work.name]  # no output
    assert sorted(p.name for p in work.iterdir()) == ["model-block-00000.safetensors", "state.json"]
    assert read_state(work)["done"] == 1
    assert cli.run(argv) == 0
    assert json.loads((tmp_path / "out" / "llmprune_report.json").read_text())["resumed_from_block"] == 1
    assert not work.exists()


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
