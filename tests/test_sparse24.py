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
    algos = []
    found = 3  # the algorithm id the search picks
    compress = staticmethod(lambda w: w.clone())
    search = staticmethod(lambda packed, b: EmulatedKernels.found)

    @staticmethod
    def mm(packed, b, bias, algo):
        EmulatedKernels.calls += 1
        EmulatedKernels.algos.append(algo)
        y = (packed.float() @ b.float()).t().contiguous().to(b.dtype)
        return y if bias is None else y + bias


@pytest.fixture
def emulated(monkeypatch):
    for name in ("compress", "search", "mm"):
        monkeypatch.setattr(sparse24.Kernels, name, getattr(EmulatedKernels, name))
    EmulatedKernels.calls = 0
    EmulatedKernels.algos = []
    EmulatedKernels.found = 3
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


def test_choose_takes_the_fastest_configuration_only_past_the_margin():
    a, b = sparse24.Algo(1), sparse24.Algo(2)
    assert sparse24.choose(1.0, {a: 0.9, b: 0.8}) == (sparse24.Choice(True, b), 0.8)
    assert sparse24.choose(1.0, {a: 0.9, b: 0.97}) == (sparse24.Choice(True, a), 0.9)
    assert sparse24.choose(1.0, {a: 0.96}) == (sparse24.Choice(False, a), 0.96)  # 4% faster: not enough


def test_search_algos_takes_the_searched_algorithm(emulated):
    core = sparse24.SparseCore(torch.tensor([[1.0, 0.0, 3.0, 0.0]] * 8), None, sparse24.Plan())
    x = torch.randn(5, 4)
    emulated.found = 7
    assert sparse24.search_algos(core, x) == [sparse24.Algo(7)]

    def fails(packed, b):
        raise RuntimeError("CUSPARSE_STATUS_INTERNAL_ERROR")

    sparse24.Kernels.search = staticmethod(fails)
    assert sparse24.search_algos(core, x) == [sparse24.Algo()]


def test_search_returns_the_algorithm_id_alone(monkeypatch):
    class Cusparselt:  # mm_search returns (alg, split_k, split_k_mode, max_alg_id); on the H200 split_k is -1
        mm_search = staticmethod(lambda packed, b, *args: (7, -1, 2, 40))

    packed, b = torch.zeros(8, 4), torch.zeros(4, 8)
    monkeypatch.setattr(torch._C, "_cusparselt", Cusparselt, raising=False)
    assert sparse24._search(packed, b) == 7
    monkeypatch.setattr(torch._C, "_cusparselt", None, raising=False)  # torch without it: the older search
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda packed, b, transpose_result: 9)
    assert sparse24._search(packed, b) == 9


def test_plan_keeps_the_fastest_configuration_and_calls_it(emulated, monkeypatch):
    # production's candidates: the one algorithm cuSPARSELt's search picks for a shape and (padded) token count
    monkeypatch.setattr(sparse24.Kernels, "search", staticmethod(lambda packed, b: {8: 3, 32: 5}[b.shape[1]]))
    sparse_s = {sparse24.Algo(3): 12.0, sparse24.Algo(5): 1.0}  # dense takes 10 s: sparse loses at 1 token, wins at 32
    current = {}

    def sparse_mm(self, x2, algo=sparse24.Algo()):
        current["algo"] = algo
        return sparse24.Kernels.mm(self.packed, x2.t(), self.bias, algo)

    def timer(fn, reps):
        current.clear()
        fn()
        return sparse_s.get(current.get("algo"), 10.0)

    monkeypatch.setattr(sparse24.SparseCore, "sparse_mm", sparse_mm)
    monkeypatch.setattr(sparse24, "timeit", timer)
    model = pruned_24()
    _, plan = sparse24.sparsify(model, buckets=(1, 32), reps=1)
    rows = {(t["tokens"], t["alg"], t["chosen"], t["sparse_ms"], t["dense_ms"]) for t in plan.timings}
    assert rows == {(1, 3, "dense", 12e3, 1e4), (32, 5, "sparse", 1e3, 1e4)}
    assert all(t["candidates"] == [{"alg": t["alg"], "ms": t["sparse_ms"]}] for t in plan.timings)
    emulated.algos = []
    with torch.no_grad():
        model(input_ids=random_tokens(1, 1))  # 1 token: dense, the faster there
        assert emulated.algos == []
        model(input_ids=random_tokens(1, 20))  # bucket 32: the searched algorithm 5
    assert emulated.algos == [sparse24.Algo(5)] * 8


def test_capturing_uses_graph_choices_and_restores_the_mode(emulated):
    model = pruned_24()
    _, plan = sparse24.sparsify(model, buckets=(32,), reps=1)
    for (m, k, b) in list(plan.choices):
        plan.choices[(m, k, b)] = sparse24.Choice(sparse=False)
        plan.choices[("graph", k, b)] = sparse24.Choice(sparse=True)
    ids = random_tokens(1, 20)
    emulated.calls = 0
    with torch.no_grad():
        model(input_ids=ids)
        assert emulated.calls == 0  # eager: dense everywhere
        with plan.capturing():
            assert plan.mode == "graph"
            model(input_ids=ids)
        assert emulated.calls == 8 and plan.mode == "eager"
        with pytest.raises(ValueError), plan.capturing():
            raise ValueError
        assert plan.mode == "eager"


def greedy_dynamic(model, ids, steps):
    kw = sparse24.cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    cache, tok = getattr(out, kw), out.logits[:, -1:].argmax(-1)
    toks = [tok]
    for _ in range(steps):
        out = model(input_ids=tok, use_cache=True, **{kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
        toks.append(tok)
    return torch.cat(toks, 1), out.logits[:, -1]


def test_static_decoder_matches_dynamic_cache_decode(emulated):
    model = pruned_24()
    ids = random_tokens(2, 12)
    with torch.no_grad():
        ref, ref_logits = greedy_dynamic(model, ids, 6)
        dec = sparse24.StaticDecoder(model, ids, max_len=24, graph=False)
        assert torch.equal(dec.generate(6), ref)
        torch.testing.assert_close(dec.logits, ref_logits)
        _, plan = sparse24.sparsify(model, buckets=(8,), reps=1)
        plan.force = True  # the emulated sparse kernel in every Linear, fused q/k/v and gate/up
        emulated.calls = 0
        dec = sparse24.StaticDecoder(model, ids, max_len=24, plan=plan, graph=False)
        assert torch.equal(dec.generate(6), ref)
        assert emulated.calls == 8 * 7  # prefill + 6 steps, 8 cores each


def test_static_decoder_refuses_a_cache_too_small(emulated):
    model = pruned_24()
    with pytest.raises(UsageError, match="max_len"):
        sparse24.StaticDecoder(model, random_tokens(1, 10), max_len=10, graph=False)
    dec = sparse24.StaticDecoder(model, random_tokens(1, 10), max_len=12, graph=False)
    dec.step(), dec.step()
    with pytest.raises(UsageError, match="full"):
        dec.step()


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
def test_gpu_core_matches_dense(tokens, dtype=torch.bfloat16):
    w = bench.mask_24(torch.randn(256, 512, dtype=dtype, device="cuda"))
    b = torch.randn(256, dtype=dtype, device="cuda")
    core = sparse24.SparseCore(w, b, sparse24.Plan(force=True))
    x = torch.randn(2, tokens, 512, dtype=dtype, device="cuda")
    y = core(x)
    assert y.shape == (2, tokens, 256) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=2e-2, atol=2e-1)


@pytest.mark.gpu
@cuda
def test_gpu_refuses_float16():
    w = bench.mask_24(torch.randn(64, 64, dtype=torch.float16, device="cuda"))
    with pytest.raises(UsageError, match="bfloat16 only"):
        sparse24.SparseCore(w, None, sparse24.Plan())


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


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens", [16, 2048])
def test_gpu_searched_configurations_match_dense(tokens, dtype=torch.bfloat16):
    w = bench.mask_24(torch.randn(4096, 4096, dtype=dtype, device="cuda"))
    core = sparse24.SparseCore(w, None, sparse24.Plan())
    x = torch.randn(tokens, 4096, dtype=dtype, device="cuda")
    ref = F.linear(x.float(), w.float())
    for algo in sparse24.search_algos(core, x):
        y = core.sparse_mm(x, algo).float()
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-2, algo


@pytest.mark.gpu
@cuda
def test_gpu_graph_decode_of_dense_model_matches_dynamic_cache():
    model = pruned_24().to("cuda")
    model.set_attn_implementation("sdpa")  # "eager" attention copies a host scalar into its mask: no capture  # float32: the same greedy tokens expected
    ids = random_tokens(2, 16).cuda()
    with torch.no_grad():
        ref, _ = greedy_dynamic(model, ids, 10)
        out = sparse24.StaticDecoder(model, ids, max_len=40).generate(8)
    assert out.shape == ref.shape and torch.equal(out, ref)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("force", [False, True])
def test_gpu_graph_decode_matches_eager_and_keeps_its_captured_dispatch(force):
    model = pruned_24().to("cuda", torch.bfloat16)
    model.set_attn_implementation("sdpa")
    ids = random_tokens(2, 16).cuda()
    with torch.no_grad():
        _, plan = sparse24.sparsify(model, buckets=(8, 32), reps=1)
        plan.force = force
        eager = sparse24.StaticDecoder(model, ids, max_len=40, plan=plan, graph=False)
        eager_tokens = eager.generate(10)
        graph = sparse24.StaticDecoder(model, ids, max_len=40, plan=plan, graph=True)
        plan.force = not force  # a replay runs what was chosen at capture: the plan is not consulted again
        graph_tokens = graph.generate(8)
    assert torch.equal(graph_tokens, eager_tokens)
    torch.testing.assert_close(graph.logits, eager.logits, rtol=0, atol=0)
