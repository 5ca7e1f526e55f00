"""Planning dense vs sparse per weight shape and token bucket: timings faked on CPU, the searched
configurations checked on the GPU behind the gpu marker."""

import pytest
import torch
import torch.nn.functional as F

from llmprune.inference import kernel, planning, swap

from .conftest import mask_24, pruned_24, random_tokens

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_choose_takes_the_fastest_configuration_only_past_the_margin():
    a, b = kernel.Algo(1), kernel.Algo(2)
    assert planning.choose(1.0, {a: 0.9, b: 0.8}) == (kernel.Choice(True, b), 0.8)
    assert planning.choose(1.0, {a: 0.9, b: 0.97}) == (kernel.Choice(True, a), 0.9)
    assert planning.choose(1.0, {a: 0.96}) == (kernel.Choice(False, a), 0.96)  # 4% faster: not enough


def test_search_algos_takes_the_searched_algorithm(emulated):
    core = kernel.SparseCore(torch.tensor([[1.0, 0.0, 3.0, 0.0]] * 8), None, kernel.Plan())
    x = torch.randn(5, 4)
    emulated.found = 7
    assert planning.search_algos(core, x) == [kernel.Algo(7)]

    def fails(packed, b):
        raise RuntimeError("CUSPARSE_STATUS_INTERNAL_ERROR")

    kernel.Kernels.search = staticmethod(fails)
    assert planning.search_algos(core, x) == [kernel.Algo()]


def test_plan_keeps_the_fastest_configuration_and_calls_it(emulated, monkeypatch):
    # production's candidates: the one algorithm cuSPARSELt's search picks for a shape and (padded) token count
    monkeypatch.setattr(kernel.Kernels, "search", staticmethod(lambda packed, b: {8: 3, 32: 5}[b.shape[1]]))
    sparse_s = {kernel.Algo(3): 12.0, kernel.Algo(5): 1.0}  # dense takes 10 s: sparse loses at 1 token, wins at 32
    current = {}

    def sparse_mm(self, x2, algo=kernel.Algo()):
        current["algo"] = algo
        return kernel.Kernels.mm(self.packed, x2.t(), self.bias, algo)

    def timer(fn, reps):
        current.clear()
        fn()
        return sparse_s.get(current.get("algo"), 10.0)

    monkeypatch.setattr(kernel.SparseCore, "sparse_mm", sparse_mm)
    monkeypatch.setattr(planning, "timeit", timer)
    model = pruned_24()
    _, plan = swap.sparsify(model, buckets=(1, 32), reps=1)
    rows = {(t["tokens"], t["alg"], t["chosen"], t["sparse_ms"], t["dense_ms"]) for t in plan.timings}
    assert rows == {(1, 3, "dense", 12e3, 1e4), (32, 5, "sparse", 1e3, 1e4)}
    assert all(t["candidates"] == [{"alg": t["alg"], "ms": t["sparse_ms"]}] for t in plan.timings)
    emulated.algos = []
    with torch.no_grad():
        model(input_ids=random_tokens(1, 1))  # 1 token: dense, the faster there
        assert emulated.algos == []
        model(input_ids=random_tokens(1, 20))  # bucket 32: the searched algorithm 5
    assert emulated.algos == [kernel.Algo(5)] * 8


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens", [16, 2048])
def test_gpu_searched_configurations_match_dense(tokens, dtype=torch.bfloat16):
    w = mask_24(torch.randn(4096, 4096, dtype=dtype, device="cuda"))
    core = kernel.SparseCore(w, None, kernel.Plan())
    x = torch.randn(tokens, 4096, dtype=dtype, device="cuda")
    ref = F.linear(x.float(), w.float())
    for algo in planning.search_algos(core, x):
        y = core.sparse_mm(x, algo).float()
        assert float((y - ref).abs().max() / ref.abs().max()) < 1e-2, algo
