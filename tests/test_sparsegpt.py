import pytest
import torch

from llmprune import NM, Unstructured
from llmprune.guards import NumericalError, record_numerical_warnings
from llmprune.methods import SparseGPT
from llmprune.methods.sparsegpt import inverse_cholesky, pruned_errors
from llmprune.patterns import select
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


class FixedHessian:
    def __init__(self, matrix):
        self.matrix = matrix
        self.memo = {}


def test_indefinite_hessian_gets_more_dampening_with_a_warning():
    # eigenvalues 4 and -2, mean diagonal 1: dampening 0.01, 0.1 and 1 fail, 10 factorises
    h = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    with record_numerical_warnings() as notes:
        new_w, keep = SparseGPT().prune(w, {"hessian": FixedHessian(h)}, Unstructured(0.5))
    assert notes == ["Hessian not positive definite with dampening 0.01; factorised with 10"]
    assert keep.sum() == 2 and torch.isfinite(new_w).all()


def test_hessian_beyond_repair_is_an_error_not_a_fallback():
    h = torch.tensor([[1.0, 1e6], [1e6, 1.0]])
    with pytest.raises(NumericalError, match=r"cannot be factorised even with dampening 100 .*--nsamples"):
        SparseGPT().prune(torch.ones(2, 2), {"hessian": FixedHessian(h)}, Unstructured(0.5))


def test_dampening_warning_lands_in_the_layer_results(monkeypatch):
    import llmprune
    from llmprune.stats import Hessian as RealHessian

    from .conftest import random_tokens, tiny_model

    real = RealHessian.matrix.fget

    def shifted(self):  # smallest eigenvalue -5% of the mean diagonal: 1% dampening fails, 10% works
        h = real(self).double()
        shift = torch.linalg.eigvalsh(h)[0] + 0.05 * h.diagonal().mean()
        return (h - shift * torch.eye(h.shape[0], dtype=h.dtype)).float()

    monkeypatch.setattr(RealHessian, "matrix", property(shifted))
    res = llmprune.prune(tiny_model("llama"), calib_tokens=random_tokens(4, 32), method="sparsegpt",
                         device=torch.device("cpu"), progress=False)
    assert res.warnings and len(res.warnings) == len(res.layers)
    assert res.layers[0].warnings == ["model.layers.0.self_attn.q_proj: Hessian not positive definite with "
                                      "dampening 0.01; factorised with 0.1"]


def _reference(weight, hessian, pattern, blocksize=128, damp=0.01):
    """The paper's column-by-column loop, written out plainly: the closed-form solve must match it."""
    w = weight.float().clone()
    h = hessian.matrix.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones_like(w, dtype=torch.bool)
    cols = w.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1, keep1, h1 = w[:, i1:i2].clone(), keep[:, i1:i2], hinv[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        if isinstance(pattern, Unstructured):
            keep1.copy_(select(w1.pow(2) / h1.diagonal().pow(2).unsqueeze(0), pattern, "matrix"))
        for i in range(i2 - i1):
            if isinstance(pattern, NM) and i % pattern.m == 0:
                sl = slice(i, i + pattern.m)
                keep1[:, sl] = select(w1[:, sl].pow(2) / h1.diagonal()[sl].pow(2).unsqueeze(0), pattern)
            e = w1[:, i] * ~keep1[:, i] / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            w1[:, i] *= keep1[:, i]
            err[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return w * keep, keep


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.3), NM(2, 4), NM(1, 4), NM(4, 8)])
@pytest.mark.parametrize("blocksize", [16, 128])
def test_matches_the_column_loop(pattern, blocksize):
    w, _, stats = problem(rows=40, cols=96, tokens=1024, seed=3)
    ref_w, ref_keep = _reference(w, stats["hessian"], pattern, blocksize)
    new_w, keep = SparseGPT(blocksize=blocksize).prune(w, stats, pattern)
    assert torch.equal(keep, ref_keep)
    assert torch.allclose(new_w, ref_w, atol=1e-5, rtol=1e-5)


def test_batched_solve_equals_column_substitution():
    w, _, stats = problem(rows=30, cols=48)
    u = inverse_cholesky(stats["hessian"], 0.01)[0][:32, :32]
    pruned = torch.rand(30, 32, generator=torch.Generator().manual_seed(1)) < 0.5
    a = pruned_errors(w[:, :32], pruned, u, batched=True)
    b = pruned_errors(w[:, :32], pruned, u, batched=False)
    assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert (a[~pruned] == 0).all()


def test_layers_reading_one_input_share_one_inverse():
    w, _, stats = problem()
    SparseGPT().prune(w, stats, Unstructured(0.5))
    first = stats["hessian"].memo[("inverse_cholesky", 0.01)][0]
    SparseGPT().prune(w * 2, stats, NM(2, 4))
    assert stats["hessian"].memo[("inverse_cholesky", 0.01)][0] is first
