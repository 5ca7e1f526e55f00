"""Structured importance scores and the shared-columns least-squares fit, on hand-computed tensors."""

import pytest
import torch

from llmprune.methods import channels
from llmprune.methods.channels import (IMPORTANCE, compensation_bias, cosine_sum, fluctuation, group_scores,
                                       keep_top, magnitude, obs_keep, wanda_sp)
from llmprune.methods.update import exact_lsq, lsq_columns, lsq_update
from llmprune.stats import Hessian, InputMeans, InputNorms


def stats_of(x: torch.Tensor) -> dict:
    out = {}
    for name, cls in (("norms", InputNorms), ("means", InputMeans), ("hessian", Hessian)):
        out[name] = cls(x.shape[-1], torch.device("cpu"))
        out[name].add(x)
    return out


def test_wanda_sp_is_column_mean_of_abs_weight_times_input_norm():
    w = torch.tensor([[1.0, -2.0, 3.0, 4.0], [3.0, 2.0, -1.0, 0.0]])
    x = torch.tensor([[10.0, 1.0, 0.0, 0.1], [-10.0, 1.0, 0.0, -0.1]])  # rms per column: 10, 1, 0, 0.1
    expected = torch.tensor([2.0 * 10, 2.0 * 1, 2.0 * 0, 2.0 * 0.1])
    assert torch.allclose(wanda_sp(w, stats_of(x)), expected)
    # magnitude: the column norms, no statistics
    assert torch.allclose(magnitude(w, {}), torch.tensor([10.0, 8.0, 10.0, 16.0]).sqrt())


def test_fluctuation_is_input_variance_times_squared_column_norm():
    w = torch.tensor([[1.0, 2.0, 1.0], [1.0, 0.0, 3.0]])
    # column 0 constant (variance 0: its output is a constant, removable with a bias), column 1 var 1, column 2 var 4
    x = torch.tensor([[5.0, 1.0, 2.0], [5.0, -1.0, -2.0], [5.0, 1.0, 2.0], [5.0, -1.0, -2.0]])
    assert torch.allclose(fluctuation(w, stats_of(x)), torch.tensor([0.0, 1.0 * 4, 4.0 * 10]))
    assert IMPORTANCE["flap"].needs == ("norms", "means") and IMPORTANCE["flap"].head_power == 2.0
    assert IMPORTANCE["magnitude"].needs == ()


def test_group_scores_sum_channels_per_group_with_power():
    scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, 0.5])
    assert group_scores(scores, 3).tolist() == [3.0, 7.0, 1.0]
    assert group_scores(scores, 3, power=2).tolist() == [5.0, 25.0, 0.5]


def test_keep_top_sorted_and_ties_keep_the_earlier_index():
    assert keep_top(torch.tensor([3.0, 1.0, 3.0, 2.0]), 2).tolist() == [0, 2]
    assert keep_top(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]
    with pytest.raises(ValueError):
        keep_top(torch.tensor([1.0]), 2)


def test_compensation_bias_restores_the_mean_output_and_is_exact_for_constant_channels():
    torch.manual_seed(0)
    w = torch.randn(3, 4)
    x = torch.randn(50, 4)
    x[:, 1] = 2.5  # a constant channel: removing it with the bias changes no output at all
    st = stats_of(x)
    kept = torch.tensor([0, 2, 3])
    b = compensation_bias(w, st["means"].mean, kept)
    assert torch.allclose(b, w[:, 1] * 2.5, atol=1e-6)
    assert torch.allclose(x[:, kept] @ w[:, kept].T + b, x @ w.T, atol=1e-5)


def test_cosine_sum():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[0.0, 2.0], [2.0, 2.0]]])
    assert cosine_sum(a, b) == (pytest.approx(1.0), 2)


def test_lsq_columns_equals_lstsq_and_the_masked_solvers():
    torch.manual_seed(0)
    x = torch.randn(300, 10) @ torch.randn(10, 10)
    w = torch.randn(6, 10)
    h = stats_of(x)["hessian"].matrix
    kept = torch.tensor([0, 1, 4, 6, 9])
    # undampened: plain least squares of the dense outputs on the kept inputs
    ref = torch.linalg.lstsq(x[:, kept].double(), (x @ w.T).double()).solution.T
    assert torch.allclose(lsq_columns(w, kept, h, damp=0.0).double(), ref, atol=1e-4)
    # dampened: the same objective as lsq_update / exact_lsq with every row keeping the same columns
    mask = torch.zeros(6, 10, dtype=torch.bool)
    mask[:, kept] = True
    fitted = lsq_columns(w, kept, h, damp=0.01)
    assert torch.allclose(fitted.double(), exact_lsq(w, mask, h, 0.01)[:, kept], atol=1e-5)
    assert torch.allclose(fitted, lsq_update(w, mask, h, 0.01, iters=200)[:, kept], atol=1e-4)
    # and it never does worse than the sliced weights on the calibration inputs
    err = lambda v: ((x[:, kept] @ v.T - x @ w.T) ** 2).sum()
    assert err(fitted) < err(w[:, kept])


def test_lsq_columns_with_cross_fits_the_dense_outputs():
    torch.manual_seed(3)
    y = torch.randn(300, 10) @ torch.randn(10, 10)  # the layer's inputs in the dense model
    x = y + 0.3 * torch.randn(300, 10)  # and in the pruned one, token by token
    w = torch.randn(6, 10)
    kept = torch.tensor([0, 2, 3, 7, 8])
    h = stats_of(x)["hessian"].matrix
    cross = (2 / 300) * x.T @ y
    ref = torch.linalg.lstsq(x[:, kept].double(), (y @ w.T).double()).solution.T
    assert torch.allclose(lsq_columns(w, kept, h, 0.0, cross).double(), ref, atol=1e-4)
    assert torch.allclose(lsq_columns(w, kept, h, 0.01, h), lsq_columns(w, kept, h, 0.01))  # C = H: the plain fit
    fitted = lsq_columns(w, kept, h, 0.01, cross)
    err = lambda v: ((x[:, kept] @ v.T - y @ w.T) ** 2).sum()
    assert err(fitted) < err(lsq_columns(w, kept, h, 0.01)) < err(w[:, kept])


def refit_error(w, h, kept_cols, damp):
    """The damped re-fit objective min_V tr((W - V) Hd (W - V)^T) with V zero outside ``kept_cols``, directly."""
    w, h = w.double(), h.double()
    hd = h + damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    total = torch.trace(w @ hd @ w.T)
    if len(kept_cols) == 0:
        return float(total)
    k = torch.tensor(kept_cols)
    return float(total - torch.trace(w @ hd[:, k] @ torch.linalg.solve(hd[k][:, k], hd[k] @ w.T)))


def brute_greedy(w, h, groups, keep, damp):
    """Greedy removal by trying every live group and re-solving the re-fit from scratch."""
    size = w.shape[1] // groups
    alive = list(range(groups))
    cols = lambda gs: [g * size + i for g in gs for i in range(size)]
    while len(alive) > keep:
        errors = [refit_error(w, h, cols([g for g in alive if g != c]), damp) for c in alive]
        alive.remove(alive[min(range(len(alive)), key=errors.__getitem__)])
    return alive


@pytest.mark.parametrize("groups", [12, 4])
def test_obs_keep_is_the_greedy_of_exact_refits(groups):
    torch.manual_seed(1)
    x = torch.randn(400, 12) @ torch.randn(12, 12) + torch.randn(12)
    w = torch.randn(5, 12)
    st = stats_of(x)
    for keep in (groups - 1, groups // 2, 1):
        assert obs_keep(w, st, groups, keep, 0.01).tolist() == brute_greedy(w, st["hessian"].matrix, groups, keep, 0.01)
    assert IMPORTANCE["obs"].needs == ("hessian",)
    assert IMPORTANCE["obs"].keep(w, st, groups, groups // 2, 0.01).tolist() == brute_greedy(
        w, st["hessian"].matrix, groups, groups // 2, 0.01)


def test_obs_keep_by_hand_with_uncorrelated_inputs():
    # orthogonal inputs: H is diagonal, a removed column cannot be re-fitted from the others, and the cost of
    # column j is ||W_:j||^2 * (H_jj + d); with d = 0, H = diag(16, 1, 0.25, 4)
    x = torch.tensor([[4.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 2.0]])
    w = torch.tensor([[1.0, 2.0, 3.0, 1.5]])  # costs 16, 4, 2.25, 9 -> column 2 goes first, then column 1
    st = stats_of(x)
    assert obs_keep(w, st, 4, 3, 0.0).tolist() == [0, 1, 3]
    assert obs_keep(w, st, 4, 2, 0.0).tolist() == [0, 3]
    assert obs_keep(torch.ones(1, 4), {"hessian": st["hessian"]}, 4, 1, 0.0).tolist() == [0]


def test_obs_keep_removes_jointly_above_the_step_limit(monkeypatch):
    torch.manual_seed(2)
    x = torch.randn(200, 8) @ torch.randn(8, 8)
    w = torch.randn(3, 8)
    st = stats_of(x)
    monkeypatch.setattr(channels, "OBS_MAX_STEPS", 1)  # one joint step: the lowest first costs go together
    hd = st["hessian"].matrix.double()
    hinv = torch.linalg.inv(hd + 0.01 * hd.diagonal().mean() * torch.eye(8, dtype=torch.float64))
    first = w.double().square().sum(0) / hinv.diagonal()
    assert obs_keep(w, st, 8, 5, 0.01).tolist() == keep_top(first, 5).tolist()
