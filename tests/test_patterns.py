import pytest
import torch

from llmprune import NM, Unstructured, UsageError, parse_pattern, select
from llmprune.methods import Magnitude, Wanda
from llmprune.patterns import check_fits
from llmprune.stats import Hessian, InputNorms


def norms_of(values):
    """InputNorms whose sqrt(mean x^2) equals ``values`` (one token per unit)."""
    acc = InputNorms(len(values), torch.device("cpu"))
    acc.add(torch.tensor([values], dtype=torch.float32))
    return acc


def test_wanda_and_magnitude_hand_computed():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    stats = {"norms": norms_of([100.0, 10.0, 1.0, 0.1])}
    # scores: 100, 20, 3, 0.4 -> Wanda keeps weights 1 and 2
    new_w, keep = Wanda().prune(w, stats, Unstructured(0.5))
    assert keep.tolist() == [[True, True, False, False]]
    assert new_w.tolist() == [[1.0, 2.0, 0.0, 0.0]]
    new_w, keep = Magnitude().prune(w, {}, Unstructured(0.5))
    assert keep.tolist() == [[False, False, True, True]]
    assert new_w.tolist() == [[0.0, 0.0, 3.0, 4.0]]


def test_wanda_compares_within_rows_magnitude_across_matrix():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    ones = {"norms": norms_of([1.0, 1.0, 1.0, 1.0])}
    _, keep = Wanda().prune(w, ones, Unstructured(0.5))
    assert keep.sum(dim=1).tolist() == [2, 2]
    _, keep = Magnitude().prune(w, {}, Unstructured(0.5))
    assert keep.tolist() == [[False, False, False, False], [True, True, True, True]]
    # an explicit scope overrides the method's default
    _, keep = Magnitude().prune(w, {}, Unstructured(0.5, scope="row"))
    assert keep.sum(dim=1).tolist() == [2, 2]


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.9])
def test_exact_counts(sparsity):
    scores = torch.rand(13, 40, generator=torch.Generator().manual_seed(1))
    keep = select(scores, Unstructured(sparsity), "row")
    assert (keep.shape[1] - keep.sum(dim=1) == int(40 * sparsity)).all()
    keep = select(scores, Unstructured(sparsity), "matrix")
    assert int((~keep).sum()) == int(13 * 40 * sparsity)
    # the pruned ones are the lowest scores
    if sparsity > 0:
        assert scores[~keep].max() <= scores[keep].min()


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8), (3, 4), (2, 8)])
def test_nm_every_group(n, m):
    scores = torch.rand(7, 64, generator=torch.Generator().manual_seed(2))
    keep = select(scores, NM(n, m))
    groups = keep.reshape(7, 64 // m, m)
    assert (groups.sum(dim=-1) == n).all()
    # within each group the kept scores are the largest
    g = scores.reshape(7, 64 // m, m)
    kept_min = torch.where(groups, g, torch.inf).min(dim=-1).values
    pruned_max = torch.where(~groups, g, -torch.inf).max(dim=-1).values
    assert (kept_min >= pruned_max).all()


def test_nm_one_of_four_is_not_three_of_four():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert select(scores, NM(1, 4)).tolist() == [[True, False, False, False]]
    assert select(scores, NM(3, 4)).tolist() == [[True, True, True, False]]


def test_ties_are_broken_by_position_the_same_way_for_nm_and_unstructured():
    # among equal scores the earlier weight is pruned (a stable sort), on every device
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 4.0, 1.0, 1.0, 1.0]])
    assert select(scores, NM(2, 4)).tolist() == [[False, False, True, True, True, False, False, True]]
    assert select(scores, NM(1, 4)).tolist() == [[False, False, False, True, True, False, False, False]]
    assert select(scores[:, :4], Unstructured(0.5)).tolist() == [[False, False, True, True]]


def test_parse_pattern():
    assert parse_pattern("2:4") == NM(2, 4)
    assert parse_pattern("unstructured", 0.5) == Unstructured(0.5)
    assert NM(2, 4).target == 0.5 and NM(1, 4).target == 0.75


@pytest.mark.parametrize("bad", ["2:", "4:2", "0:4", "a:b", "2:4:8", "", "half"])
def test_bad_patterns(bad):
    with pytest.raises(UsageError, match="--pattern"):
        parse_pattern(bad, 0.5)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_sparsity(bad):
    with pytest.raises(UsageError, match="--sparsity"):
        Unstructured(bad)


def test_m_must_divide_width():
    with pytest.raises(UsageError, match="does not divide the input width 30"):
        check_fits(NM(2, 4), 30, "layer")
    check_fits(NM(2, 4), 32, "layer")


def test_statistics_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    norms = InputNorms(2, torch.device("cpu"))
    norms.add(x[:1])
    norms.add(x[1:])  # accumulation over batches equals one pass
    assert torch.allclose(norms.mean_sq, torch.tensor([35 / 3, 56 / 3]))
    h = Hessian(2, torch.device("cpu"))
    h.add(x.to(torch.bfloat16))  # any input dtype: fp32 per batch, summed over batches in fp64
    assert h.xtx.dtype == torch.float64 and h.matrix.dtype == torch.float32
    assert torch.allclose(h.matrix, 2 * x.T @ x / 3)
