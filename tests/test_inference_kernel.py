"""The cuSPARSELt binding, the plan's dispatch and SparseCore: on CPU with the kernels emulated, the real
kernels behind the gpu marker."""

import pytest
import torch
import torch.nn.functional as F

from llmprune import UsageError
from llmprune.inference import kernel, swap

from .conftest import mask_24, pruned_24, random_tokens

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_bucket_of():
    assert [kernel.bucket_of(t) for t in (1, 2, 16, 17, 2048, 99999)] == [1, 8, 16, 32, 2048, 16384]


def test_refuses_weight_that_is_not_2to4():
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    assert not kernel.is_2to4(w)
    assert kernel.is_2to4(torch.tensor([[1.0, 0.0, 3.0, 0.0]]))
    with pytest.raises(UsageError, match="not 2:4"):
        kernel.SparseCore(w, None, kernel.Plan())


def test_permuted_core_gathers_the_input_then_multiplies(emulated):
    """A weight 2:4 only in the order (0, 1, 4, 5, 2, 3, 6, 7) (row 0 holds 3 non-zeros in columns 0-3): the core
    compresses W[:, perm] and gathers x[:, perm] first, so y = x W^T; the dense call uses W as stored."""
    w = torch.tensor([[5.0, -1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                      [0.0, 3.0, 4.0, 0.0, 1.0, 0.0, 1.0, 0.0]])
    perm = torch.tensor([0, 1, 4, 5, 2, 3, 6, 7])
    assert not kernel.is_2to4(w) and kernel.is_2to4(w[:, perm])
    b = torch.tensor([0.5, -0.5])
    core = kernel.SparseCore(w, b, kernel.Plan(force=True), perm)
    assert torch.equal(core.packed, w[:, perm]) and torch.equal(core.dense, w) and core.key[3] is True
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(core(x), F.linear(x, w, b))
    assert emulated.calls == 1
    core.plan.force = False
    torch.testing.assert_close(core(x), F.linear(x, w, b))
    assert emulated.calls == 1  # dense: no sparse call, no gather
    with pytest.raises(UsageError, match="not 2:4 sparse in its input permutation"):
        kernel.SparseCore(w, None, kernel.Plan(), torch.arange(8))


def test_search_returns_the_algorithm_id_alone(monkeypatch):
    class Cusparselt:  # mm_search returns (alg, split_k, split_k_mode, max_alg_id); on the H200 split_k is -1
        mm_search = staticmethod(lambda packed, b, *args: (7, -1, 2, 40))

    packed, b = torch.zeros(8, 4), torch.zeros(4, 8)
    monkeypatch.setattr(torch._C, "_cusparselt", Cusparselt, raising=False)
    assert kernel._search(packed, b) == 7
    monkeypatch.setattr(torch._C, "_cusparselt", None, raising=False)  # torch without it: the older search
    monkeypatch.setattr(torch, "_cslt_sparse_mm_search", lambda packed, b, transpose_result: 9)
    assert kernel._search(packed, b) == 9


def test_plan_picks_per_bucket(emulated):
    model = pruned_24()
    originals, plan = swap.sparsify(model, buckets=(1, 32), reps=1)
    key = swap.cores_of(model)[0].key
    assert {(m, b) for (m, k, b) in plan.choices if k == key} == {("eager", 1), ("eager", 32)}  # no graph on CPU
    for m, k, b in list(plan.choices):
        plan.choices[(m, k, b)] = kernel.Choice(sparse=b >= 32)
    emulated.calls = 0
    with torch.no_grad():
        model(input_ids=random_tokens(1, 1))  # 1 token: dense everywhere
        assert emulated.calls == 0
        model(input_ids=random_tokens(1, 20))  # 20 tokens -> bucket 32: sparse
        assert emulated.calls == 8
        plan.mode = "graph"  # no graph timings: the eager choice stands
        model(input_ids=random_tokens(1, 20))
        assert emulated.calls == 16


def test_capturing_uses_graph_choices_and_restores_the_mode(emulated):
    model = pruned_24()
    _, plan = swap.sparsify(model, buckets=(32,), reps=1)
    for (m, k, b) in list(plan.choices):
        plan.choices[(m, k, b)] = kernel.Choice(sparse=False)
        plan.choices[("graph", k, b)] = kernel.Choice(sparse=True)
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


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens", [1, 5, 64, 300])
def test_gpu_core_matches_dense(tokens, dtype=torch.bfloat16):
    w = mask_24(torch.randn(256, 512, dtype=dtype, device="cuda"))
    b = torch.randn(256, dtype=dtype, device="cuda")
    core = kernel.SparseCore(w, b, kernel.Plan(force=True))
    x = torch.randn(2, tokens, 512, dtype=dtype, device="cuda")
    y = core(x)
    assert y.shape == (2, tokens, 256) and y.is_contiguous()
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=2e-2, atol=2e-1)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("tokens", [1, 5, 300])
def test_gpu_permuted_core_matches_dense(tokens, dtype=torch.bfloat16):
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(tokens)).cuda()
    w = torch.randn(256, 512, dtype=dtype, device="cuda")
    w[:, perm] = mask_24(w[:, perm].clone())  # 2:4 in the order perm only
    core = kernel.SparseCore(w, None, kernel.Plan(force=True), perm)
    x = torch.randn(2, tokens, 512, dtype=dtype, device="cuda")
    torch.testing.assert_close(core(x), F.linear(x, w), rtol=2e-2, atol=2e-1)


@pytest.mark.gpu
@cuda
def test_gpu_refuses_float16():
    w = mask_24(torch.randn(64, 64, dtype=torch.float16, device="cuda"))
    with pytest.raises(UsageError, match="bfloat16 only"):
        kernel.SparseCore(w, None, kernel.Plan())
