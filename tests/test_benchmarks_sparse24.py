"""benchmarks/sparse24.py, the 2:4 speed comparison: its dense rows on CPU, and its command line."""

import importlib.util
import json

import pytest
import torch

from .conftest import REPO, tiny_model


def load_script():
    spec = importlib.util.spec_from_file_location("sparse24_benchmark", REPO / "benchmarks" / "sparse24.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_runs_dense_rows_on_cpu(tmp_path):
    cfg = tmp_path / "config.json"
    tiny_model("llama").config.to_json_file(cfg)
    r = load_script().run(str(cfg), dtype=torch.float32, device=torch.device("cpu"), tokens=(1, 16),
                          prefills=((1, 32),), decodes=(2,), reps=1, model_reps=1)
    assert [row["tokens"] for row in r["linears"]][:2] == [1, 16]
    assert all("dense_eager_ms" in row and row["llmprune_error"] for row in r["linears"])
    assert r["model_runs"]["stock"] == {"error": "needs CUDA"}
    assert {row["kind"] for row in r["model_runs"]["dense"]["rows"]} == {"prefill", "decode"}


def test_main_checks_its_arguments_and_writes_the_json(tmp_path, capsys):
    script = load_script()
    cfg, out = tmp_path / "config.json", tmp_path / "b.json"
    tiny_model("llama").config.to_json_file(cfg)
    with pytest.raises(SystemExit) as exit_:
        script.main(["--model", str(cfg), "--prefills", "2x", "--device", "cpu", "--out", str(out)])
    assert exit_.value.code == 2 and "--prefills" in capsys.readouterr().err
    script.main(["--model", str(cfg), "--dtype", "float32", "--device", "cpu", "--tokens", "4", "--prefills", "1x16",
                 "--decodes", "", "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["command"].startswith("python benchmarks/sparse24.py") and [x["tokens"] for x in r["linears"]] == [4] * 5
    assert [row["kind"] for row in r["model_runs"]["dense"]["rows"]] == ["prefill"]


def test_a_compressed_permute_folder_brings_its_orders(tmp_path, emulated):
    """A folder saved with --permute --format compressed runs the llmprune variant with its orders (emulated
    kernels on CPU): every Linear becomes a core, the logits as dense."""
    import llmprune
    from llmprune import NM
    from llmprune.export import save_pruned

    from .conftest import random_tokens

    model = tiny_model("llama")
    res = llmprune.prune(model, calib_tokens=random_tokens(4, 32), method="ria", pattern="2:4", permute=True,
                         device=torch.device("cpu"), progress=False)
    out = save_pruned(model, None, tmp_path / "c", {}, format="compressed", pattern=NM(2, 4), perms=res.permutations())
    r = load_script().run(str(out), dtype=torch.float32, device=torch.device("cpu"), prefills=((1, 16),), decodes=(),
                          reps=1, model_reps=1, variants=("llmprune",), linears=False)
    assert r["permuted_linears"] == 14
    run = r["model_runs"]["llmprune"]
    assert "error" not in run and run["check_all_sparse"]["max_abs_diff"] < 1e-4
    assert sum(row["gather"] for row in run["plan"]) > 0
