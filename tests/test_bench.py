"""The 2:4 benchmark harness: its dense rows on CPU, and the `llmprune bench` command."""

import json

import torch

from llmprune import bench

from .conftest import tiny_model


def test_bench_runs_dense_rows_on_cpu(tmp_path):
    cfg = tmp_path / "config.json"
    tiny_model("llama").config.to_json_file(cfg)
    r = bench.run(str(cfg), dtype=torch.float32, device=torch.device("cpu"), tokens=(1, 16), prefills=((1, 32),),
                  decodes=(2,), reps=1, model_reps=1)
    assert [row["tokens"] for row in r["linears"]][:2] == [1, 16]
    assert all("dense_eager_ms" in row and row["llmprune_error"] for row in r["linears"])
    assert r["model_runs"]["stock"] == {"error": "needs CUDA"}
    assert {row["kind"] for row in r["model_runs"]["dense"]["rows"]} == {"prefill", "decode"}


def test_cli_bench(tmp_path):
    from typer.testing import CliRunner

    from llmprune.cli import app

    cfg, out = tmp_path / "config.json", tmp_path / "b.json"
    tiny_model("llama").config.to_json_file(cfg)
    runner = CliRunner()
    res = runner.invoke(app, ["bench", "--model", str(cfg), "--pattern", "4:8"])
    assert res.exit_code == 2 and "only 2:4 has sparse GPU kernels" in res.output
    res = runner.invoke(app, ["bench", "--model", str(cfg), "--prefills", "2x", "--device", "cpu"])
    assert res.exit_code == 2 and "--prefills" in res.output
    res = runner.invoke(app, ["bench", "--model", str(cfg), "--dtype", "float32", "--device", "cpu", "--tokens", "4",
                              "--prefills", "1x16", "--decodes", "", "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())
    assert "command" in r and [x["tokens"] for x in r["linears"]] == [4] * 5
    assert [row["kind"] for row in r["model_runs"]["dense"]["rows"]] == ["prefill"]
