"""The command line's options beyond Wanda (--layerwise, --permute, --update): refusals, and what a run's report
records. The methods themselves are tested in test_layerwise.py, test_permute.py, test_ria.py and test_update.py;
these cases belong with the other CLI tests (test_cli.py, test_bad_input.py)."""

import json

import pytest
from typer.testing import CliRunner

from llmprune.cli import app


@pytest.mark.parametrize("args,msg", [
    (["--permute"], "--permute only changes N:M"),
    (["--layerwise", "owl", "--pattern", "2:4"], "--layerwise works with unstructured"),
    (["--update", "obs"], "--update must be"),
    (["--layerwise", "0.5,x"], "--layerwise"),
    (["--pattern", "2:4", "--permute", "--format", "compressed"], "--format dense"),
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
    assert r["method_settings"]["owl_lambda"] == 0.1 and len(s) == 3
    assert abs(sum(s) / 3 - 0.6) < 1e-12 and max(abs(v - 0.6) for v in s) == pytest.approx(0.1)
    rep = tmp_path / "ria.json"
    res = CliRunner().invoke(app, [*common, "--method", "ria", "--pattern", "2:4", "--permute", "--update", "lsq",
                                   "--report", str(rep)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert r["method"] == "ria+lsq" and r["method_settings"]["permute"] is True
    assert r["method_settings"]["update"] == "lsq" and r["sparsity_overall"] == 0.5
