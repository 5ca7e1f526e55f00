"""The command line end to end on a tiny saved model, and its answers to bad input."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from llmprune.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_prune_end_to_end(tiny_folder, tmp_path, ddir):
    out, rep = tmp_path / "pruned", tmp_path / "run.json"
    res = invoke("prune", "--model", tiny_folder, "--method", "wanda", "--sparsity", "0.5", "--nsamples", 4,
                 "--seqlen", 32, "--eval", "wikitext2,ptb", "--max-eval-windows", 3, "--out", out, "--report", rep,
                 "--data-dir", ddir, "--no-progress", "--device", "cpu", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report == json.loads((out / "llmprune_report.json").read_text())
    for key in ("model", "method", "pattern", "sparsity_target", "sparsity_overall", "calibration", "layers", "time",
                "peak_memory_bytes", "perplexity", "versions"):
        assert key in report, key
    assert report["calibration"] == {"source": "c4", "nsamples": 4, "seqlen": 32, "seed": 0}
    assert report["pattern"] == "unstructured" and report["sparsity_target"] == 0.5
    assert abs(report["sparsity_overall"] - 0.5) < 1e-9
    assert len(report["layers"]) == 3 * 7 and all(l["sparsity"] == 0.5 for l in report["layers"])
    for name in ("wikitext2", "ptb"):
        row = report["perplexity"][name]
        assert row["windows"] == 3 and row["seqlen"] == 32 and row["pruned"] > 1 and row["dense"] > 1
    assert set(report["time"]) == {"load_s", "calib_data_s", "prune_s", "eval_s"}
    model = AutoModelForCausalLM.from_pretrained(out)
    q = model.model.layers[0].self_attn.q_proj.weight
    assert int((q == 0).sum()) == q.numel() // 2
    # `eval` on the saved output gives the pruned perplexity again
    res = invoke("eval", "--model", out, "--eval", "wikitext2", "--eval-seqlen", 32, "--max-eval-windows", 3,
                 "--data-dir", ddir, "--no-progress", "--device", "cpu", "--dtype", "float32",
                 "--report", tmp_path / "eval.json")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "eval.json").read_text())["perplexity"]["wikitext2"]["perplexity"]
    assert again == pytest.approx(report["perplexity"]["wikitext2"]["pruned"], rel=1e-5)


def test_calib_tokens_used_exactly(tiny_folder, tmp_path):
    tokens = tmp_path / "t.npy"
    np.save(tokens, np.random.default_rng(0).integers(3, 300, (3, 20)))
    rep = tmp_path / "r.json"
    res = invoke("prune", "--model", tiny_folder, "--pattern", "2:4", "--calib-tokens", tokens, "--eval", "",
                 "--report", rep, "--no-progress", "--device", "cpu")
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report["calibration"]["source"] == "tokens" and report["calibration"]["nsamples"] == 3
    assert report["pattern"] == "2:4" and report["sparsity_target"] == 0.5


def _bad_cases(tiny, tmp):
    a_file = tmp / "a_file"
    a_file.write_text("x")
    empty = tmp / "empty.txt"
    empty.write_text("")
    broken_gguf = tmp / "broken.gguf"
    broken_gguf.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 20)
    not_gguf = tmp / "fake.gguf"
    not_gguf.write_bytes(b"hello")
    no_model = tmp / "no_model"
    no_model.mkdir()
    short = tmp / "short.txt"
    short.write_text("only a few words here")
    base = ["prune", "--model", tiny, "--no-progress", "--eval", "", "--seqlen", "32"]
    return [
        (base + ["--sparsity", "1.0"], "--sparsity"),
        (base + ["--sparsity", "-0.1"], "--sparsity"),
        (base + ["--pattern", "4:2"], "--pattern"),
        (base + ["--pattern", "0:4"], "--pattern"),
        (base + ["--pattern", "2:"], "--pattern"),
        (base + ["--pattern", "a:b"], "--pattern"),
        (base + ["--pattern", "2:3", "--method", "magnitude"], "does not divide"),
        (base + ["--method", "obs"], "--method"),
        (base + ["--nsamples", "0"], "--nsamples"),
        (base + ["--seqlen", "100000"], "--seqlen 100000 is longer than the model's context"),
        (base + ["--calib", empty], "empty"),
        (base + ["--calib", short], "make only 0 windows"),
        (base + ["--calib", tmp / "missing.txt"], "--calib"),
        (base + ["--eval", "wikitext3"], "--eval"),
        (base + ["--device", "cuda"], "--device cuda"),
        (base + ["--device", "tpu"], "--device"),
        (base + ["--dtype", "int8"], "--dtype"),
        (base + ["--out", a_file], "--out"),
        (base + ["--report", tmp], "--report"),
        (["prune", "--model", tmp / "does-not-exist", "--eval", ""], "no such file or folder"),
        (["prune", "--model", no_model, "--eval", ""], "not a Hugging Face model folder"),
        (["prune", "--model", broken_gguf, "--eval", ""], "cannot read the GGUF file"),
        (["prune", "--model", not_gguf, "--eval", ""], "not a GGUF file"),
        (["eval", "--model", tiny, "--eval", "ppl"], "--eval"),
        (base + ["--calib-tokens", tmp / "none.npy"], "--calib-tokens"),
    ]


def test_bad_input_one_clear_line(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "out"
    for args, expected in _bad_cases(tiny_folder, work):
        if args[0] == "prune" and "--out" not in args:
            args = args + ["--out", out]
        res = invoke(*args)
        lines = [l for l in res.output.strip().splitlines() if l.strip()]
        assert res.exit_code == 2, (args, res.output)
        assert lines and lines[-1].startswith("error:"), (args, res.output)
        assert expected in " ".join(lines), (args, res.output)
        assert not out.exists(), args
