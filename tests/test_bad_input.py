"""Bad input, across the command line and the Python API: one clear line naming the problem and the fix,
a non-zero exit (the CLI: 2), and nothing left behind in the output's folder."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel

import llmprune
from llmprune import Calibration, EvalSettings, UsageError, cli
from llmprune.export import save_pruned

from .conftest import random_tokens, tiny_model


def _write(path, content):
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _truncated_gguf(tmp):
    import gguf

    path = tmp / "whole.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    return _write(tmp / "truncated.gguf", data[: len(data) // 2])


def _mamba_folder(tmp, tokenizer):
    import transformers as tf

    path = tmp / "mamba"
    cfg = tf.MambaConfig(vocab_size=384, hidden_size=32, num_hidden_layers=2, state_size=4)
    tf.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _no_space(monkeypatch):
    """The disk fills up as the output is finished (its stem shard, after every block was saved)."""
    from llmprune import export

    def full(path, tensors):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_shard", full)


# id -> (arguments after `prune` or a full argv starting with "eval"/"prune!", text the error line must hold).
# {tiny}, {tmp}, {ddir} and {file:NAME} are filled in per test; "prune" cases get the base options.
CLI_CASES = {
    "sparsity 1.0": (["--sparsity", "1.0"], "--sparsity must be a fraction in [0, 1), got 1.0; e.g. --sparsity 0.5"),
    "sparsity -0.1": (["--sparsity", "-0.1"], "--sparsity must be a fraction in [0, 1)"),
    "sparsity abc": (["--sparsity", "abc"], "Invalid value for '--sparsity': Input should be a valid number, unable to parse string as a number; see llmprune prune --help"),
    "pattern 2:": (["--pattern", "2:"], "--pattern must be 'unstructured' or N:M such as 2:4, got '2:'"),
    "pattern 4:2": (["--pattern", "4:2"], "--pattern N:M needs integers 0 < N <= M, got 4:2; e.g. --pattern 2:4"),
    "pattern 0:4": (["--pattern", "0:4"], "needs integers 0 < N <= M, got 0:4"),
    "pattern a:b": (["--pattern", "a:b"], "got 'a:b'"),
    "pattern M not dividing": (["--pattern", "2:3", "--method", "magnitude"], "M=3 does not divide the input width 32"),
    "unknown method": (["--method", "obs"], "--method must be one of wanda, wanda-variant, ria, sparsegpt, magnitude, alps, got 'obs'"),
    "refine unknown": (["--refine", "dsnt"], "--refine must be one of none, dsnot, got 'dsnt'"),
    "refine with sparsegpt": (["--method", "sparsegpt", "--refine", "dsnot"], "--refine dsnot refines the mask of a score method (wanda, wanda-variant, ria, magnitude); sparsegpt changes the weights as it masks: drop --refine"),
    "dsnot cycles 0": (["--refine", "dsnot", "--dsnot-cycles", "0"], "--dsnot-cycles must be a positive integer, got 0; e.g. --dsnot-cycles 50"),
    "dsnot threshold negative": (["--refine", "dsnot", "--dsnot-threshold", "-1"], "--dsnot-threshold must be a finite number >= 0, got -1.0"),
    "dsnot options without refine": (["--dsnot-cycles", "10"], "--dsnot-cycles, --dsnot-threshold and --dsnot-variant set DSnoT's refinement: add --refine dsnot"),
    "dsnot variant unknown": (["--refine", "dsnot", "--dsnot-variant", "official"], "--dsnot-variant must be one of paper, llmprune, got 'official'; e.g. --dsnot-variant paper"),
    "owl variant unknown": (["--layerwise", "owl", "--owl-variant", "band"], "--owl-variant must be one of paper, llmprune, got 'band'; e.g. --owl-variant paper"),
    "owl variant without owl": (["--owl-variant", "paper"], "--owl-variant sets OWL's mapping of outlier ratios: add --layerwise owl"),
    "scope unknown": (["--scope", "rows"], "--scope must be row or matrix, got 'rows'; e.g. --scope matrix"),
    "scope with N:M": (["--pattern", "2:4", "--scope", "row"], "--scope applies to unstructured sparsity; drop --scope with --pattern 2:4"),
    "nsamples 0": (["--nsamples", "0"], "--nsamples must be a positive integer, got 0"),
    "nsamples abc": (["--nsamples", "x"], "Invalid value for '--nsamples'"),
    "seqlen beyond context": (["--seqlen", "100000"], "--seqlen 100000 is longer than the model's context of 256 tokens; use --seqlen 256 or less"),
    "seqlen 1": (["--seqlen", "1"], "--seqlen must be an integer >= 2"),
    "batch size 0": (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    "empty calibration file": (["--calib", "{file:empty.txt}"], "the file is empty"),
    "non-UTF-8 calibration file": (["--calib", "{file:latin1.txt}"], "not UTF-8 text (byte 3); convert it to UTF-8"),
    "calibration text too short": (["--calib", "{file:short.txt}"], "make only 0 windows of --seqlen 32"),
    "jsonl without text field": (["--calib", "{file:notext.jsonl}"], "line 1 has no string 'text' field"),
    "jsonl not JSON": (["--calib", "{file:broken.jsonl}"], "line 2 is not valid JSON"),
    "calibration file missing": (["--calib", "{tmp}/missing.txt"], "--calib must be c4 or wikitext2 or a path"),
    "calib tokens missing": (["--calib-tokens", "{tmp}/none.npy"], "--calib-tokens {tmp}/none.npy: no such file"),
    "calib tokens out of vocabulary": (["--calib-tokens", "{file:big.npy}"], "token ids must lie in [0, 384)"),
    "unknown eval set": (["--eval", "wikitext3"], "--eval: unknown set 'wikitext3'; choose from wikitext2, ptb, c4"),
    "unknown zero-shot task": (["--eval-tasks", "nosuchtask"], "--eval-tasks: unknown task 'nosuchtask'; choose from"),
    "eval windows 0": (["--max-eval-windows", "0"], "--max-eval-windows must be >= 1"),
    "cuda without a GPU": (["--device", "cuda"], "--device cuda: no CUDA GPU is visible on this machine; use --device cpu"),
    "unknown device": (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    "unknown weights placement": (["--weights", "disk"], "--weights must be auto, gpu or cpu, got 'disk'"),
    "weights on a GPU without one": (["--weights", "gpu", "--device", "cpu"], "--weights gpu places the model on a GPU, but --device is cpu; use --device cuda or --weights auto"),
    "weights with streaming": (["--weights", "gpu", "--stream-from-disk", "--out", "{dest}/new", "--eval", ""], "--stream-from-disk reads each block from disk when it is pruned; drop --weights gpu"),
    "unknown dtype": (["--dtype", "int8"], "--dtype must be auto, float32, bfloat16, float16, got 'int8'"),
    "output path is a file": (["--out", "{dest}/out"], "is an existing file; give a folder path"),
    "output folder not empty": (["--out", "{dest}/full"], "exists and is not empty; choose another folder or pass --overwrite"),
    "output parent missing": (["--out", "{tmp}/no/such/out"], "the parent folder {tmp}/no/such does not exist; create it first"),
    "report path is a folder": (["--report", "{tmp}"], "--report {tmp} is a folder; give a file path such as run.json"),
    "report under a file": (["--report", "{tmp}/a-file/run.json"], "--report {tmp}/a-file/run.json: cannot write there"),
    "eval: report under a file": (["eval", "--model", "{tiny}", "--report", "{tmp}/a-file/run.json"], "--report {tmp}/a-file/run.json: cannot write there"),
    "data dir missing": (["--data-dir", "{tmp}/nodata"], "--data-dir {tmp}/nodata is not a directory"),
    "model path missing": (["prune!", "--model", "{tmp}/does-not-exist"], "no such file or folder"),
    "folder that is not a model": (["prune!", "--model", "{file:no_model}"], "the folder has no config.json, so it is not a Hugging Face model folder"),
    "GGUF truncated in the middle": (["prune!", "--model", "{file:truncated.gguf}"], "cannot read the GGUF file, it may be truncated or corrupt; download it again"),
    "not a GGUF file": (["prune!", "--model", "{file:fake.gguf}"], "not a GGUF file (bad magic bytes)"),
    "unsupported architecture": (["prune!", "--model", "{file:mamba}"], "unsupported architecture MambaForCausalLM"),
    "nsamples too large for memory": (["--nsamples", "64"], "the run needs about 0.0 GiB more CPU memory but 0.0 GiB are free"),
    "no disk space": (["--out", "{dest}/new"], "no space left on the device; free some space or choose a folder on another disk"),
    "eval: altered output": (["eval", "--model", "{file:altered}"], "model.safetensors does not match its checksum"),
    "eval: unknown set": (["eval", "--model", "{tiny}", "--eval", "ppl"], "--eval: unknown set 'ppl'"),
}


@pytest.fixture
def files(tmp_path, tokenizer, tiny_folder):
    tmp = tmp_path / "inputs"
    tmp.mkdir()
    made = {
        "empty.txt": lambda: _write(tmp / "empty.txt", ""),
        "latin1.txt": lambda: _write(tmp / "latin1.txt", "caf\xe9 au lait".encode("latin-1")),
        "short.txt": lambda: _write(tmp / "short.txt", "only a few words here"),
        "notext.jsonl": lambda: _write(tmp / "notext.jsonl", json.dumps({"content": "x"}) + "\n"),
        "broken.jsonl": lambda: _write(tmp / "broken.jsonl", json.dumps({"text": "x"}) + "\n{text: y}\n"),
        "big.npy": lambda: (np.save(tmp / "big.npy", np.full((2, 32), 9999)), tmp / "big.npy")[1],
        "no_model": lambda: (tmp / "no_model").mkdir() or tmp / "no_model",
        "truncated.gguf": lambda: _truncated_gguf(tmp),
        "fake.gguf": lambda: _write(tmp / "fake.gguf", b"hello"),
        "mamba": lambda: _mamba_folder(tmp, tokenizer),
        "altered": lambda: _altered_output(tmp, tokenizer),
    }
    return tmp, made


def _altered_output(tmp, tokenizer):
    out = save_pruned(tiny_model("llama"), tokenizer, tmp / "saved", {})
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-1] ^= 1
    (out / "model.safetensors").write_bytes(bytes(blob))
    return out


def _argv(case, tiny, tmp, dest, ddir, made):
    args, expected = CLI_CASES[case]

    def fill(text):
        if text.startswith("{file:"):
            return str(made[text[6:-1]]())
        return text.format(tiny=tiny, tmp=tmp, dest=dest, ddir=ddir)

    args = [fill(a) for a in args]
    expected = fill(expected)
    if args[0] == "eval":
        return args + ["--no-progress", "--data-dir", str(ddir)], expected
    base = ["--no-progress", "--eval", "", "--seqlen", "32", "--nsamples", "2", "--data-dir", str(ddir),
            "--device", "cpu"]
    if args[0] == "prune!":
        args = args[1:]
    else:
        base = ["--model", str(tiny)] + base
    if "--out" not in args:
        base += ["--out", str(dest / "out")]
    return ["prune"] + base + args, expected


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input(case, files, tiny_folder, tmp_path, ddir, monkeypatch, capsys):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tmp, made = files
    dest = tmp_path / "dest"
    dest.mkdir()
    if case == "output path is a file":
        (dest / "out").write_text("x")
    if case == "output folder not empty":
        (dest / "full").mkdir()
        (dest / "full" / "keep").write_text("x")
    if case == "no disk space":
        _no_space(monkeypatch)
    if case == "nsamples too large for memory":  # as if the machine had 1 KiB free
        monkeypatch.setattr("llmprune.api.cpu_free_bytes", lambda: 1024)
    if "report under a file" in case:  # its folder is a file: the report could never be written
        (tmp / "a-file").write_text("x")
    before = sorted(p.name for p in dest.iterdir())
    argv, expected = _argv(case, tiny_folder, tmp, dest, ddir, made)
    code = cli.run(argv)
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert code == 2, (argv, captured)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]
    left = sorted(p.name for p in dest.iterdir())
    if case == "no disk space":  # finished blocks are kept to resume from; no output, no partial folder
        assert left == [".new.llmprune-work"] and "re-run the same command to finish" in lines[0]
    else:
        assert left == before


def _api_cases(tmp, tokenizer):
    model = tiny_model("llama")
    tokens = random_tokens(2, 16)

    def prune(**kw):
        kw = {"calib_tokens": tokens, "device": "cpu", "progress": False, **kw}
        return llmprune.prune(kw.pop("model", model), tokenizer, **kw)

    def other_settings():
        prune(checkpoint_dir=tmp / "work", sparsity=0.5)
        prune(model=tiny_model("llama"), checkpoint_dir=tmp / "work", sparsity=0.6)

    def no_space():
        import unittest.mock as mock

        with mock.patch.object(PreTrainedModel, "save_pretrained", side_effect=OSError(errno.ENOSPC, "full")):
            save_pruned(model, tokenizer, tmp / "out", {})

    return {
        "pattern 2:": (lambda: prune(pattern="2:"), "--pattern must be 'unstructured' or N:M"),
        "pattern 1:0": (lambda: prune(pattern="1:0"), "0 < N <= M, got 1:0"),
        "sparsity 1.0": (lambda: prune(sparsity=1.0), "--sparsity must be a fraction in [0, 1)"),
        "sparsity as text": (lambda: llmprune.Unstructured("abc"), "--sparsity must be a fraction in [0, 1), got 'abc'"),
        "refine unknown": (lambda: prune(refine="dsnt"), "--refine must be one of none, dsnot, got 'dsnt'"),
        "refine with sparsegpt": (lambda: prune(method="sparsegpt", refine="dsnot"), "--refine dsnot refines the mask"),
        "dsnot cycles 0": (lambda: llmprune.DSnoT(cycles=0), "--dsnot-cycles must be a positive integer, got 0"),
        "nsamples 0": (lambda: Calibration("c4", nsamples=0), "--nsamples must be a positive integer, got 0"),
        "unknown method": (lambda: prune(method="obs"), "--method must be one of"),
        "batch size 0": (lambda: prune(batch_size=0), "--batch-size must be >= 1"),
        "tokens longer than the context": (lambda: prune(calib_tokens=random_tokens(1, 300)),
                                           "--calib-tokens seqlen 300 is longer than the model's context of 256"),
        "cuda without a GPU": (lambda: prune(device="cuda"), "no CUDA GPU is visible"),
        "unsupported architecture": (lambda: llmprune.prune(torch.nn.Linear(4, 4), calib_tokens=tokens, device="cpu",
                                                            progress=False), "unsupported architecture Linear"),
        "unknown eval set": (lambda: EvalSettings(("wikitext3",)), "--eval: unknown set 'wikitext3'"),
        "not a model folder": (lambda: llmprune.load_model(str(tmp)), "not a Hugging Face model folder"),
        "checkpoint of other settings": (other_settings, "differs in: sparsity_target"),
        "no disk space": (no_space, "no space left on the device"),
    }


API_IDS = [
    "pattern 2:", "pattern 1:0", "sparsity 1.0", "sparsity as text", "refine unknown", "refine with sparsegpt",
    "dsnot cycles 0", "nsamples 0", "unknown method", "batch size 0",
    "tokens longer than the context", "cuda without a GPU", "unsupported architecture", "unknown eval set",
    "not a model folder", "checkpoint of other settings", "no disk space"]


@pytest.mark.parametrize("case", API_IDS)
def test_api_bad_input(case, tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    tmp = tmp_path / "work-area"
    tmp.mkdir()
    cases = _api_cases(tmp, tokenizer)
    assert sorted(cases) == sorted(API_IDS)
    call, expected = cases[case]
    with pytest.raises(UsageError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and expected in message, message
    if case != "checkpoint of other settings":
        assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("name,content,expected", [
    ("notext.jsonl", json.dumps({"content": "x"}) + "\n", "line 1 has no string 'text' field"),
    ("latin1.jsonl", "{\"text\": \"caf\xe9\"}\n".encode("latin-1"), "not UTF-8 text"),
    ("empty.txt", "", "the file is empty"),
])
def test_bad_calibration_file_is_refused_before_the_model_loads(name, content, expected, tmp_path, tiny_folder,
                                                                 monkeypatch, capsys):
    from llmprune import loading

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the calibration file was checked")

    monkeypatch.setattr(loading, "load_model", never)
    path = _write(tmp_path / name, content)
    code = cli.run(["prune", "--model", str(tiny_folder), "--calib", str(path), "--eval", "", "--device", "cpu",
                    "--no-progress"])
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], lines
