"""2:4 inference path: the swap logic on CPU (cuSPARSELt emulated), the real kernels behind the gpu marker."""

import json

import pytest
import torch
import torch.nn.functional as F

import llmprune
from llmprune import UsageError, bench, sparse24

from .conftest import random_tokens, tiny_model


class EmulatedKernels:
    """cuSPARSELt semantics on CPU: compress keeps the matrix, mm returns (A @ B)^T row-major."""

    calls = 0
    compress = staticmethod(lambda w: w.clone())
    search = staticmethod(lambda packed, b: 0)

    @staticmethod
    def mm(packed, b, bias, alg):
        EmulatedKernels.calls += 1
        y = (packed.float() @ b.float()).t().contiguous().to(b.dtype)
        return y if bias is None else y + bias


@pytest.fixture
def emulated(monkeypatch):
    for name in ("compress", "search", "mm"):
        monkeypatch.setattr(sparse24.Kernels, name, getattr(EmulatedKernels, name))
    EmulatedKernels.calls = 0
    return EmulatedKernels


def pruned_24(arch="llama"):
    model = tiny_model(arch)
    llmprune.prune(model, calib_tokens=random_tokens(4, 32), pattern="2:4", device=torch.device("cpu"), progress=False)
    return model


def test_bucket_of():
    assert [sparse24.bucket_of(t) for t in (1, 2, 16, 17, 2048, 99999)] == [1, 8, 16, 32, 2048, 16384]


def test_refuses_weight_that_is_not_2to4():
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert not sparse24.is_2to4(w)
    assert sparse24.is_2to4(torch.tensor([[1.0, 0.0, 3.0, 0.0]]))
    with pytest.raises(UsageError, match="not 2:4"):
        sparse24.SparseCore(w, None, sparse24.Plan())


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_swap_matches_dense_and_restores(emulated, arch):
    model = pruned_24(arch)
    ids = random_tokens(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        originals, plan = sparse24.sparsify(model, buckets=(32,), reps=1)
        plan.force = True
        emulated.calls = 0
        out = model(input_ids=ids).logits
    n_cores = len(sparse24.cores_of(model))
    # llama: qkv, o, gate+up, down; opt: qkv, out_proj, fc1, fc2 -> 4 cores in each of 2 blocks
    assert n_cores == 8
    assert emulated.calls == n_cores
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    sparse24.restore(originals)
    assert not sparse24.cores_of(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_plan_picks_per_bucket(emulated):
    model = pruned_24()
    originals, plan = sparse24.sparsify(model, buckets=(1, 32), reps=1)
    key = sparse24.cores_of(model)[0].key
    assert {(m, b) for (m, k, b) in plan.choices if k == key} == {("eager", 1), ("eager", 32)}  # no graph on CPU
    for m, k, b in list(plan.choices):
        plan.choices[(m, k, b)] = sparse24.Choice(sparse=b >= 32)
    emulated.calls = 0
    with torch.no_grad():
        model(input_ids=random_tokens(1, 1))  # 1 token: dense everywhere
        assert emulated.calls == 0
        model(input_ids=random_tokens(1, 20))  # 20 tokens -> bucket 32: sparse
        assert emulated.calls == 8
        plan.mode = "graph"  # no graph timings: the eager choice stands
        model(input_ids=random_tokens(1, 20))
        assert emulated.calls == 16


def test_refuses_model_without_2to4_layers(emulated):
    with pytest.raises(UsageError, match="no 2:4 Linear"):
        sparse24.sparsify(tiny_model("llama"))


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


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
def test_gpu_core_matches_dense(tokens):
    w = bench.mask_24(torch.randn(256, 512, dtype=torch.bfloat16, device="cuda"))
    b = torch.randn(256, dtype=torch.bfloat16, device="cuda")
    core = sparse24.SparseCore(w, b, sparse24.Plan(force=True))
    x = torch.randn(2, tokens, 512, dtype=torch.bfloat16, device="cuda")
    y = core(x)
    assert y.shape == (2, tokens, 256) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=2e-2, atol=2e-1)


@pytest.mark.gpu
@cuda
def test_gpu_model_matches_dense():
    model = pruned_24().to("cuda", torch.bfloat16)
    cfg = model.config
    ids = random_tokens(2, 40).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        _, plan = sparse24.sparsify(model, reps=1)
        plan.force = True
        out = model(input_ids=ids).logits.float()
    assert cfg.vocab_size == out.shape[-1]
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)
