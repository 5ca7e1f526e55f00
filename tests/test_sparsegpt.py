import pytest
import torch

from llmprune import NM, Unstructured
from llmprune.methods import SparseGPT
from llmprune.stats import Hessian


def problem(rows=24, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5  # correlated inputs make the update matter
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + mix)
    h = Hessian(cols, torch.device("cpu"))
    h.add(x)
    return w, x, {"hessian": h}


def err(w, w_hat, x):
    return torch.linalg.norm(x @ w.T - x @ w_hat.T).item()


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(1, 4), NM(4, 8)])
def test_update_beats_plain_masking_with_the_same_mask(pattern):
    w, x, stats = problem()
    new_w, keep = SparseGPT(blocksize=16).prune(w, stats, pattern)
    assert (new_w[~keep] == 0).all()
    assert err(w, new_w, x) < err(w, w * keep, x)


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8)])
def test_nm_groups(n, m):
    w, _, stats = problem()
    new_w, keep = SparseGPT(blocksize=16).prune(w, stats, NM(n, m))
    assert (keep.reshape(w.shape[0], -1, m).sum(-1) == n).all()
    assert ((new_w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all()


def test_unstructured_exact_count_per_block():
    w, _, stats = problem(rows=10, cols=64)
    _, keep = SparseGPT(blocksize=32).prune(w, stats, Unstructured(0.5))
    for i in range(0, 64, 32):
        assert int((~keep[:, i : i + 32]).sum()) == int(10 * 32 * 0.5)


def test_zero_sparsity_keeps_weights():
    w, _, stats = problem()
    new_w, keep = SparseGPT().prune(w, stats, Unstructured(0.0))
    assert keep.all()
    assert torch.allclose(new_w, w, atol=1e-5)


def test_dead_inputs_are_zeroed_and_output_dtype_kept():
    w, x, _ = problem(cols=16)
    x[:, 3] = 0
    h = Hessian(16, torch.device("cpu"))
    h.add(x)
    new_w, _ = SparseGPT().prune(w.to(torch.bfloat16), {"hessian": h}, NM(2, 4))
    assert new_w.dtype == torch.bfloat16
    assert (new_w[:, 3] == 0).all()
