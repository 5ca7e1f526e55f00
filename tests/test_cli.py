"""The command line end to end on a tiny saved model (bad input: test_bad_input.py)."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from llmprune.cli import app
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
    assert set(report["time"]) == {"load_s", "calib_data_s", "prune_s", "eval_s", "save_s"}
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
