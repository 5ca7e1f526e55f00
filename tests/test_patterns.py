"""Sparsity patterns and the shared select (patterns.py): exact counts, N:M groups, ties, parsing."""

import pytest
import torch

from llmprune import NM, Unstructured, UsageError, parse_pattern, select
from llmprune.patterns import check_fits


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
    # a tie at the cut among other scores: one of the two 1s goes, the earlier (position 1, not 2)
    mixed = torch.tensor([[3.0, 1.0, 1.0, 2.0]])
    assert select(mixed, NM(3, 4)).tolist() == [[True, False, True, True]]
    assert select(mixed, Unstructured(0.25), "row").tolist() == [[True, False, True, True]]
    # matrix scope: earlier is in row-major order, so the 1 at (0, 1) goes and the 1 at (1, 0) stays
    square = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    assert select(square, Unstructured(0.25), "matrix").tolist() == [[True, False], [True, True]]
    # groups and rows of 32: torch's CPU sort without stable=True returns equal values of a row this long out of
    # order (rows of up to 16 come out in order either way), so these cases tell a stable sort from an unstable one
    wide = torch.ones(2, 32)
    assert select(wide, NM(1, 32)).tolist() == [[False] * 31 + [True]] * 2
    assert select(wide, Unstructured(0.5), "row").tolist() == [[False] * 16 + [True] * 16] * 2
    assert select(wide, Unstructured(0.5), "matrix").tolist() == [[False] * 32, [True] * 32]


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


@pytest.mark.parametrize("m", [2, 4, 8])
def test_nm_ranks_equal_a_stable_sort(m):
    """The comparison ranks a GPU uses for N:M masks are the positions of a stable ascending sort, ties included."""
    from llmprune.patterns import _prune_lowest, nm_ranks

    gen = torch.Generator().manual_seed(m)
    groups = torch.randint(0, 3, (4000, m), generator=gen).float()  # many exact ties
    expected = torch.sort(groups, dim=1, stable=True).indices.argsort(dim=1)
    assert torch.equal(nm_ranks(groups).long(), expected)
    for k in range(1, m):
        assert torch.equal(nm_ranks(groups) >= k, _prune_lowest(groups, k))


def test_parse_pattern_scope():
    assert parse_pattern("unstructured", 0.5, "matrix") == Unstructured(0.5, "matrix")
    assert parse_pattern("unstructured", 0.5, " Row ") == Unstructured(0.5, "row")
    assert parse_pattern("unstructured", 0.5) == Unstructured(0.5, None)
    with pytest.raises(UsageError, match="--scope must be row or matrix, got 'rows'; e.g. --scope matrix"):
        parse_pattern("unstructured", 0.5, "rows")
    with pytest.raises(UsageError, match="--scope applies to unstructured sparsity; drop --scope with --pattern 2:4"):
        parse_pattern("2:4", scope="row")
