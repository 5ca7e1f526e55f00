"""What the score methods share (methods/base.py): each method's comparison group, pinned by hand."""

import torch

from llmprune import Unstructured
from llmprune.methods import Magnitude, Wanda

from .conftest import norms_of


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
