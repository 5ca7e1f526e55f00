"""ALPS: ADMM over the support, then conjugate gradients on it (methods/alps.py)."""

import pytest
import torch

from llmprune import api
from llmprune.methods import ALPS, SparseGPT, Wanda, get_method
from llmprune.methods.alps import next_rho, support_cg
from llmprune.patterns import NM, Unstructured
from llmprune.stats import Hessian, InputNorms

from .conftest import random_tokens, tiny_model


def layer_problem(cin=64, cout=32, tokens=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cin, cin, generator=g) / cin ** 0.5 + torch.eye(cin)
    x = (torch.randn(tokens, cin, generator=g) @ mix) * torch.linspace(0.1, 3, cin)
    w = torch.randn(cout, cin, generator=g)
    h, norms = Hessian(cin, torch.device("cpu")), InputNorms(cin, torch.device("cpu"))
    h.add(x)
    norms.add(x)
    return w, x, {"hessian": h, "norms": norms}


def output_error(new, w, x) -> float:
    d = (new - w).double() @ x.double().T
    return (d ** 2).sum().item() / ((w.double() @ x.double().T) ** 2).sum().item()


def test_with_an_identity_hessian_the_kept_weights_keep_their_values():
    # (W - W0) c I (W - W0)^T on a fixed support is smallest at W0's own values: the CG step must land there,
    # whichever support the ADMM settled on
    w = torch.tensor([[4.0, -1.0, 3.0, 0.5], [-2.0, 6.0, -0.25, 1.0]])
    h = Hessian(4, torch.device("cpu"))
    h.add(torch.eye(4) * 3.0)
    for pattern in (Unstructured(0.5), NM(2, 4)):
        new, keep = ALPS().prune(w, {"hessian": h}, pattern)
        assert int(keep.sum()) == 4 and torch.allclose(new, w * keep, atol=1e-5)
        assert keep[1, 1] and keep[0, 0]  # the two largest weights survive any settled support


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(4, 8)])
def test_exact_counts_and_lower_error_than_the_baselines(pattern):
    w, x, stats = layer_problem()
    new, keep = ALPS().prune(w, stats, pattern)
    assert torch.equal(new != 0, keep)
    if isinstance(pattern, NM):  # exactly n kept in every group of m inputs of a row
        assert (keep.reshape(-1, pattern.m).sum(1) == pattern.n).all()
    else:  # over the whole matrix, as in the paper
        assert int((~keep).sum()) == int(w.numel() * pattern.sparsity)
    errors = {}
    for name, method in (("alps", ALPS()), ("sparsegpt", SparseGPT()), ("wanda", Wanda()),
                         ("wanda+lsq", get_method("wanda", update="lsq"))):
        stats["hessian"].memo.clear()
        errors[name] = output_error(method.prune(w, stats, pattern)[0], w, x)
    assert errors["alps"] < min(errors["sparsegpt"], errors["wanda"], errors["wanda+lsq"]), errors


def test_row_scope_chooses_per_output_row():
    w, x, stats = layer_problem()
    _, keep = ALPS().prune(w, stats, Unstructured(0.5, "row"))
    assert (keep.sum(1) == w.shape[1] // 2).all()


def test_support_cg_reaches_the_restricted_least_squares_solution():
    w, x, stats = layer_problem(cin=24, cout=5)
    hn = stats["hessian"].matrix.double()
    target = w.double() @ hn
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    b = support_cg(hn, target, w.double() * keep, keep, iters=60)
    for i in range(w.shape[0]):  # direct solve of each row's system on its support
        s = keep[i]
        exact = torch.linalg.solve(hn[s][:, s], target[i, s])
        assert torch.allclose(b[i, s], exact, rtol=1e-6, atol=1e-8)
        assert (b[i, ~s] == 0).all()


def test_rho_schedule_by_hand():
    assert next_rho(0.1, False, 0.2, 100) == pytest.approx((0.13, True, False, False))
    assert next_rho(0.1, True, 0.01, 10) == pytest.approx((0.12, True, False, False))
    assert next_rho(1.0, True, 0.001, 3) == pytest.approx((1.1, True, False, False))
    assert next_rho(1.0, False, 0.001, 3) == pytest.approx((0.2, False, True, False))  # settled too early: restart
    assert next_rho(1.0, False, 0.0, 0) == pytest.approx((0.2, False, False, False))
    assert next_rho(1.0, True, 0.0, 0) == pytest.approx((1.0, True, False, True))  # settled after growing: stop
    assert next_rho(9e5, True, 0.2, 5)[0] == 1e6


def test_alps_prunes_a_model_through_the_api():
    model, tokens = tiny_model("llama"), random_tokens(4, 32)
    result = api.prune(model, method="alps", pattern="2:4", calib_tokens=tokens, device="cpu", progress=False)
    assert result.method == "alps" and result.method_settings["max_iter"] == 300
    for layer in result.layers:
        assert layer.zeros == layer.shape[0] * layer.shape[1] // 2


def test_the_memory_estimate_counts_alps_working_memory():
    from llmprune import memory

    model = tiny_model("llama")
    sizes = memory.ModelSizes.of(model, torch.device("cpu"))
    rows, cols = sizes.largest_weight
    args = (sizes, 4, 32, 2, ("hessian",), torch.device("cpu"), False)
    base, alps = memory.estimate(*args), memory.estimate(*args, ALPS.work_bytes)
    extra = (ALPS.work_bytes[0] - 8) * rows * cols + (ALPS.work_bytes[1] - 12) * cols * cols
    assert alps.parts["statistics"] - base.parts["statistics"] == extra


def test_permuted_alps_is_nm_in_its_recorded_order_and_keeps_what_a_fixed_order_cannot():
    # with an identity Hessian ALPS keeps the largest |W| the pattern allows. In the stored order the four large
    # weights share one group of 4, so 2:4 keeps 9, 8 and two 1s; reordered, two large ones sit in each group
    w = torch.tensor([[9.0, 8.0, 7.0, 6.0, 1.0, 1.0, 1.0, 1.0]])
    h = Hessian(8, torch.device("cpu"))
    h.add(torch.eye(8))
    plain = ALPS().prune_ordered(w, {"hessian": h}, NM(2, 4))
    permuted = ALPS(permute=True).prune_ordered(w, {"hessian": h}, NM(2, 4))
    assert plain.perm is None and sorted(w[plain.keep].tolist()) == [1.0, 1.0, 8.0, 9.0]
    assert permuted.perm is not None and sorted(permuted.perm.tolist()) == list(range(8))
    groups = permuted.keep[:, permuted.perm].reshape(-1, 4)
    assert torch.equal(groups.sum(1), torch.tensor([2, 2]))  # exactly 2:4 in the recorded order
    assert sorted(w[permuted.keep].tolist()) == [6.0, 7.0, 8.0, 9.0]
    assert torch.allclose(permuted.weight, w * permuted.keep, atol=1e-5)


def test_permute_changes_nothing_for_unstructured_alps_and_alps_accepts_it():
    w, x, stats = layer_problem()
    plain = ALPS().prune_ordered(w, stats, Unstructured(0.5))
    permuted = ALPS(permute=True).prune_ordered(w, stats, Unstructured(0.5))
    assert permuted.perm is None and torch.equal(plain.keep, permuted.keep)  # no order without groups
    from llmprune.methods import permutable_names

    assert "alps" in permutable_names()
