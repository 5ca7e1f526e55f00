import pytest
import torch

from llmprune import NM, Unstructured
from llmprune.guards import NumericalError, record_numerical_warnings
from llmprune.methods import SparseGPT
from llmprune.errors import UsageError
from llmprune.methods.sparsegpt import block_solver, inverse_cholesky, prune_block, pruned_errors
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


# --- the Triton block kernel against the torch solver -------------------------------------------
# Off a GPU the kernel runs in Triton's interpreter, which must be switched on before triton is first
# imported: the interpreted cases run in one subprocess and the tests compare what it saved.

KERNEL_PATTERNS = [NM(2, 4), NM(1, 4), NM(4, 8), Unstructured(0.5)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
HAND_H = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # H^-1 = [[2, -1], [-1, 2]] / 3
HAND_W = torch.tensor([[1.0, 3.0], [4.0, 1.0]], dtype=torch.float64)
TIE_W = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0, 1.0, -1.0, 1.0]], dtype=torch.float64)


def float64_problem(rows=40, cols=256, tokens=1024, seed=0, device="cpu"):
    """Float64 weights and Hessian: no near-ties for rounding to flip, so both solvers give one mask."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) / cols**0.5
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ (torch.eye(cols, dtype=torch.float64) + mix)
    return w.to(device), (2 * x.T @ x / tokens).to(device)


def kernel_cases() -> dict:
    """name -> (weight, Hessian, pattern, SparseGPT fields) of every interpreted case."""
    cases = {f"random {p}": (*float64_problem(), p, {}) for p in KERNEL_PATTERNS}
    for p in (NM(2, 4), Unstructured(0.5)):  # 72 = 48 + 24: a last block narrower than a power of two
        cases[f"narrow {p}"] = (*float64_problem(rows=37, cols=72, seed=2), p, {"blocksize": 48})
    cases["hand"] = (HAND_W, HAND_H, NM(1, 2), {"damp": 0.0})
    cases["ties"] = (TIE_W, torch.eye(8, dtype=torch.float64), NM(2, 4), {})
    return cases


def run(case, solver):
    w, h, pattern, fields = case
    return SparseGPT(solver=solver, **fields).prune(w, {"hessian": FixedHessian(h)}, pattern)


def save_kernel_results(path: str) -> None:
    """Run in the interpreter's subprocess: the kernel's (weight, keep) of every case, to ``path``."""
    torch.save({name: run(case, "triton") for name, case in kernel_cases().items()}, path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")  # importing it here is harmless: only the subprocess interprets
    out = tmp_path_factory.mktemp("kernel") / "results.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    code = f"from tests.test_sparsegpt import save_kernel_results; save_kernel_results({str(out)!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=Path(__file__).parents[1], timeout=600)
    return torch.load(out)


def nm_counts(keep, m):
    return keep.reshape(keep.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("name", [f"random {p}" for p in KERNEL_PATTERNS] + ["narrow 2:4", "narrow unstructured"])
def test_kernel_matches_the_torch_solver_in_float64(interpreted, name):
    case = kernel_cases()[name]
    (kw, kk), (tw, tk) = interpreted[name], run(case, "torch")
    assert kw.dtype == torch.float64
    assert torch.equal(kk, tk)
    assert torch.allclose(kw, tw, rtol=0, atol=1e-10)
    assert (kw[~kk] == 0).all()
    if isinstance(case[2], NM):
        assert (nm_counts(kk, case[2].m) == case[2].n).all()


# 1:2 without dampening; U (upper factor of H^-1): U00^2 = 2/3, U01 = -1/sqrt(6), U11^2 = 1/2.
# Row 0 scores 1/(2/3) < 9/(1/2): prune w0, OBS moves w1 by w0 * -Hinv01/Hinv00 = +1/2 -> 3.5.
# Row 1 scores 16/(2/3) > 1/(1/2): prune w1, the last column: nothing later to update.
HAND_KEEP = [[False, True], [True, False]]
HAND_RESULT = torch.tensor([[0.0, 3.5], [4.0, 0.0]], dtype=torch.float64)


def test_hand_checked_update_torch_solver():
    new_w, keep = run(kernel_cases()["hand"], "torch")
    assert keep.tolist() == HAND_KEEP
    assert torch.allclose(new_w, HAND_RESULT, atol=1e-12)


def test_hand_checked_update_kernel(interpreted):
    new_w, keep = interpreted["hand"]
    assert keep.tolist() == HAND_KEEP
    assert torch.allclose(new_w, HAND_RESULT, atol=1e-12)


# an identity Hessian: U is diagonal with one value, nothing is updated, scores are w^2: 1 1 1 1, then 4 1 1 1
TIE_KEEP = [[False, False, True, True, True, False, False, True]]  # among equal scores the earlier is pruned


def test_ties_break_by_position_torch_solver():
    new_w, keep = run(kernel_cases()["ties"], "torch")
    assert keep.tolist() == TIE_KEEP
    assert torch.equal(new_w, TIE_W * keep)


def test_ties_break_by_position_kernel(interpreted):
    new_w, keep = interpreted["ties"]
    assert keep.tolist() == TIE_KEEP
    assert torch.equal(new_w, TIE_W * keep)


def test_auto_solver_uses_torch_for_cpu_tensors():
    assert block_solver("auto", torch.zeros(2, 2)) is prune_block
    with pytest.raises(UsageError, match="solver"):
        SparseGPT(solver="cuda")


def both_solvers(w, h, pattern):
    return run((w, h, pattern, {}), "triton"), run((w, h, pattern, {}), "torch")


@pytest.mark.parametrize("pattern", KERNEL_PATTERNS)
@pytest.mark.gpu
@needs_cuda
def test_kernel_matches_the_torch_solver_on_gpu_in_float64(pattern):
    pytest.importorskip("triton")
    w, h = float64_problem(rows=200, cols=512, tokens=2048, seed=4, device="cuda")
    (kw, kk), (tw, tk) = both_solvers(w, h, pattern)
    assert torch.equal(kk, tk)
    assert torch.allclose(kw, tw, rtol=0, atol=1e-10)


@pytest.mark.parametrize("pattern", KERNEL_PATTERNS)
@pytest.mark.gpu
@needs_cuda
def test_kernel_agrees_with_the_torch_solver_on_gpu_in_float32(pattern):
    pytest.importorskip("triton")
    w, h = float64_problem(rows=1024, cols=1024, tokens=4096, seed=6, device="cuda")
    (kw, kk), (tw, tk) = both_solvers(w.float(), h.float(), pattern)
    assert (kk == tk).float().mean() >= 0.99
    assert (kw[~kk] == 0).all() and torch.isfinite(kw).all()
    if isinstance(pattern, NM):
        assert (nm_counts(kk, pattern.m) == pattern.n).all()
