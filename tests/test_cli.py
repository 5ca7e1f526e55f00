"""The command line end to end on a tiny saved model (bad input: test_bad_input.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmprune
from llmprune import UsageError, cli
from llmprune.cli import app, run
from llmprune.methods.magnitude import Magnitude
from llmprune.integrity import MANIFEST_NAME, state_sha256

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
    assert set(report["time"]) == {"load_s", "calib_data_s", "cuda_init_s", "place_s", "prune_s", "eval_s", "save_s", "hash_s",
                                   "startup_s"}
    assert report["time"]["startup_s"] > 0  # seconds since the process started (/proc, Linux)
    assert report["weights_sha256"] == state_sha256(AutoModelForCausalLM.from_pretrained(out))
    assert report["resumed_from_block"] == 0 and report["warnings"] == []
    assert (out / MANIFEST_NAME).is_file()
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


def boom(*args, **kwargs):
    raise RuntimeError("kernel failed\nwith a second line")


def prune_args(folder):
    return ["prune", "--model", str(folder), "--method", "magnitude", "--eval", "", "--no-progress", "--device", "cpu",
            "--dtype", "float32"]


def stderr_lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_unexpected_error_is_one_line(tiny_folder, monkeypatch, capsys):
    monkeypatch.setattr(Magnitude, "score", boom)  # fails deep inside the pruning of block 0
    assert run(prune_args(tiny_folder)) == 1
    lines = stderr_lines(capsys.readouterr().err)
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: llmprune prune failed in llmprune/")
    assert "RuntimeError: kernel failed with a second line; run again with --debug for the traceback" in lines[0]


def test_debug_prints_the_traceback(tiny_folder, monkeypatch, capsys):
    monkeypatch.setattr(Magnitude, "score", boom)
    assert run(["--debug", *prune_args(tiny_folder)]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in boom" in err
    assert stderr_lines(err)[-1].startswith("error: llmprune prune failed") and "--debug" not in stderr_lines(err)[-1]


def test_usage_error_and_interrupt_keep_their_exit_codes(tiny_folder, monkeypatch, capsys):
    assert run([*prune_args(tiny_folder), "--pattern", "3:2"]) == 2
    assert stderr_lines(capsys.readouterr().err)[0].startswith("error: --pattern")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Magnitude, "score", interrupt)
    assert run(prune_args(tiny_folder)) == 130


FAILING_KERNEL = """import torch.nn.functional as F

def linear(*args, **kwargs):
    raise RuntimeError("injected kernel failure")

F.linear = linear
"""


def test_installed_command_prints_one_line_then_the_traceback_with_debug(tiny_folder, tmp_path, ddir):
    """The user's path: the `llmprune` script in a fresh process; every Linear's kernel fails (injected at start-up)."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(FAILING_KERNEL)
    src = Path(llmprune.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "inject"), str(src)]), "LLMPRUNE_DEBUG": ""}
    command = [str(Path(sys.executable).with_name("llmprune")), "eval", "--model", str(tiny_folder), "--eval-seqlen",
               "32", "--max-eval-windows", "1", "--data-dir", str(ddir), "--no-progress", "--device", "cpu"]
    res = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr
    (line,) = stderr_lines(res.stderr)
    assert line.startswith("error: llmprune eval failed") and line.endswith(
        ": RuntimeError: injected kernel failure; run again with --debug for the traceback")
    res = subprocess.run(command, env={**env, "LLMPRUNE_DEBUG": "1"}, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr and "injected kernel failure" in res.stderr


def test_help_is_plain_text(capsys):
    """`N:M:` once came out as an emoji (rich's `:M:` shortcode) and boolean flags showed a `<bool>` value."""
    code = run(["prune", "--help"])
    text = capsys.readouterr().out
    assert code == 0 and "N:M: choose masks on permuted input channels" in " ".join(text.split())
    assert "Ⓜ" not in text and "<bool>" not in text


def test_unreachable_sparsity_is_a_warning_in_the_report_and_on_screen(tiny_folder, tmp_path, ddir, capsys):
    rep = tmp_path / "run.json"
    code = run(["prune", "--model", str(tiny_folder), "--sparsity", "0.999", "--method", "magnitude", "--eval", "",
                "--device", "cpu", "--no-progress", "--report", str(rep), "--data-dir", str(ddir)])
    report = json.loads(rep.read_text())
    reached = report["sparsity_overall"]  # magnitude compares over each matrix: int(rows x cols x 0.999) pruned
    assert code == 0 and 0.99 < reached < 0.999 - 1e-4
    assert report["warnings"] == [f"sparsity reached {reached:.4f}, not the target 0.9990: each comparison group "
                                  "(a row, a matrix or an N:M group) prunes a whole number of weights, and weights "
                                  "that were zero before count as pruned"]
    assert f"warning: sparsity reached {reached:.4f}" in " ".join(capsys.readouterr().err.split())
    run(["prune", "--model", str(tiny_folder), "--sparsity", "0.5", "--method", "magnitude", "--eval", "",
         "--device", "cpu", "--no-progress", "--report", str(rep), "--data-dir", str(ddir)])
    assert json.loads(rep.read_text())["warnings"] == []


def test_eval_of_a_saved_folder_uses_the_window_the_prune_run_used(tiny_folder, tmp_path, ddir, capsys):
    out, rep, ev = tmp_path / "out", tmp_path / "run.json", tmp_path / "eval.json"
    common = ["--device", "cpu", "--dtype", "float32", "--no-progress", "--data-dir", str(ddir), "--max-eval-windows", "3"]
    assert run(["prune", "--model", str(tiny_folder), "--seqlen", "32", "--nsamples", "2", "--out", str(out),
                "--report", str(rep), *common]) == 0
    assert run(["eval", "--model", str(out), "--report", str(ev), *common]) == 0
    pruned, again = json.loads(rep.read_text())["perplexity"]["wikitext2"], json.loads(ev.read_text())["perplexity"]["wikitext2"]
    assert again["seqlen"] == pruned["seqlen"] == 32 and again["perplexity"] == pruned["pruned"]
    capsys.readouterr()
    assert run(["eval", "--model", str(tiny_folder), *common]) == 2  # not a llmprune output: 2048, beyond its context
    assert "--eval-seqlen 2048 is longer than the model's context of 256 tokens" in capsys.readouterr().err


def test_summary_says_where_the_report_and_model_are_and_which_way_is_better(tiny_folder, tmp_path, ddir, capsys):
    out, rep = tmp_path / "out", tmp_path / "runs" / "demo.json"
    assert run(["prune", "--model", str(tiny_folder), "--seqlen", "32", "--nsamples", "2", "--max-eval-windows", "2",
                "--device", "cpu", "--dtype", "float32", "--no-progress", "--data-dir", str(ddir), "--out", str(out),
                "--report", str(rep)]) == 0
    text = capsys.readouterr().out
    assert "perplexity: lower is better; cpu, float32" in text
    assert f"report written to {rep}" in text and f"pruned model saved in {out}" in text
    assert "time: load" in text and "sparsity 0.5000 (target 0.5000) on cpu in float32" in text


@pytest.mark.parametrize("args,msg", [
    (["--permute"], "--permute only changes N:M"),
    (["--layerwise", "owl", "--pattern", "2:4"], "--layerwise works with unstructured"),
    (["--update", "obs"], "--update must be"),
    (["--layerwise", "0.5,x"], "--layerwise"),
])
def test_cli_refuses_bad_options(args, msg, tmp_path):
    res = CliRunner().invoke(app, ["prune", "--model", str(tmp_path / "nowhere"), *args], catch_exceptions=False)
    assert res.exit_code == 2 and msg in res.output.replace("\n", " ")


def test_cli_owl_and_ria_permute_update_reports(tiny_folder, tmp_path, ddir):
    common = ["prune", "--model", str(tiny_folder), "--nsamples", "4", "--seqlen", "32", "--eval", "",
              "--data-dir", str(ddir), "--no-progress", "--device", "cpu", "--dtype", "float32"]
    rep = tmp_path / "owl.json"
    res = CliRunner().invoke(app, [*common, "--sparsity", "0.6", "--layerwise", "owl", "--owl-lambda", "0.1",
                                   "--report", str(rep)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    s = r["method_settings"]["block_sparsity"]
    assert r["method_settings"]["owl_lambda"] == 0.1 and len(s) == 3 and r["method_settings"]["owl_variant"] == "paper"
    assert abs(sum(s) / 3 - 0.6) < 1e-12 and max(s) - min(s) == pytest.approx(0.2)  # the paper's band: 2 lambda
    res = CliRunner().invoke(app, [*common, "--sparsity", "0.6", "--layerwise", "owl", "--owl-lambda", "0.1",
                                   "--owl-variant", "llmprune", "--report", str(rep)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    s = r["method_settings"]["block_sparsity"]
    assert abs(sum(s) / 3 - 0.6) < 1e-12 and max(abs(v - 0.6) for v in s) == pytest.approx(0.1)
    rep = tmp_path / "ria.json"
    res = CliRunner().invoke(app, [*common, "--method", "ria", "--pattern", "2:4", "--permute", "--update", "lsq",
                                   "--report", str(rep)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert r["method"] == "ria+lsq" and r["method_settings"]["permute"] is True
    assert r["method_settings"]["update"] == "lsq" and r["sparsity_overall"] == 0.5
