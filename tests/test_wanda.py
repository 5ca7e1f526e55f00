"""Wanda (methods/wanda.py): the hand-computed case where it keeps what magnitude prunes, and the variant's
cumulative rows."""

import torch

from llmprune import NM, Unstructured
from llmprune.methods import Magnitude, Wanda
from llmprune.methods.wanda import cumulative_mask
from llmprune.patterns import select

from .conftest import norms_of


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


def test_wanda_variant_hits_target_with_cumulative_rows():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(64, 128, generator=g) * torch.rand(64, 1, generator=g)
    keep = cumulative_mask(scores, 0.5, tol=1e-3)
    assert abs(float((~keep).double().mean()) - 0.5) <= 1e-3
    per_row = (~keep).sum(1)
    assert per_row.min() < per_row.max()  # rows differ
    for r in range(64):  # in each row, the pruned are the lowest scores
        if 0 < per_row[r] < 128:
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()
    assert Wanda(variant=True).mask(scores, NM(2, 4)).equal(select(scores, NM(2, 4)))
