"""benchmarks/perm_gather.py, the gather's cost on the 2:4 path: its CPU dry run (emulated kernels) computes what
dense computes, and its command line; the GPU run is the measurement."""

import importlib.util
import json

import pytest
import torch

from llmprune.inference import kernel

from .conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("perm_gather_benchmark", REPO / "benchmarks" / "perm_gather.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_weights_are_24_only_in_their_order():
    w, perm = load_script().permuted_24(16, 64, torch.float32, torch.device("cpu"))
    assert kernel.is_2to4(w[:, perm]) and not kernel.is_2to4(w)


def test_dry_run_on_cpu_is_correct_and_leaves_the_kernels_as_they_were(tmp_path):
    script = load_script()
    before = kernel.Kernels.mm
    out = tmp_path / "g.json"
    script.main(["--device", "cpu", "--dtype", "float32", "--tokens", "1,16", "--reps", "1", "--out", str(out)])
    assert kernel.Kernels.mm is before
    r = json.loads(out.read_text())
    assert r["emulated_kernels"] is True and r["command"].startswith("python benchmarks/perm_gather.py")
    assert [(row["out"], row["in"], row["tokens"]) for row in r["rows"]] == [(64, 32, 1), (64, 32, 16), (32, 64, 1),
                                                                             (32, 64, 16)]
    for row in r["rows"]:
        assert row["max_rel_err_vs_dense"] < 1e-5 and row["equals_sparse_of_gathered"]
        assert set(row["eager"]) == {"dense_ms", "gather_ms", "sparse_ms", "gathered_ms", "gather_share"}
        assert "graph" not in row  # CUDA graphs only on CUDA


def test_bad_shapes_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_script().main(["--device", "cpu", "--shapes", "64x30"])
    assert exit_.value.code == 2 and "IN a multiple of 4" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_run_is_correct_on_a_small_shape(tmp_path):
    r = load_script().run(((256, 512),), (1, 300), torch.bfloat16, torch.device("cuda"), reps=2)
    assert r["emulated_kernels"] is False
    for row in r["rows"]:
        assert row["max_rel_err_vs_dense"] < 2e-2 and set(row) >= {"eager", "graph"}
