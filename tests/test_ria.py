"""RIA (methods/ria.py): the score of a 2x2 layer by hand. Its --permute runs are in test_permute.py."""

import torch

from llmprune import Unstructured
from llmprune.methods import RIA
from llmprune.stats import InputNorms

CPU = torch.device("cpu")


def test_ria_score_2x2_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    norms = InputNorms(2, CPU)
    norms.add(torch.tensor([[2.0, 4.0]]))  # ||X_0|| = 2, ||X_1|| = 4 -> ^0.5: sqrt(2), 2
    score = RIA().score(w, {"norms": norms})
    # row sums 3, 7; column sums 4, 6
    expected = torch.tensor([[(1 / 3 + 1 / 4) * 2**0.5, (2 / 3 + 2 / 6) * 2],
                             [(3 / 7 + 3 / 4) * 2**0.5, (4 / 7 + 4 / 6) * 2]])
    assert torch.allclose(score, expected, rtol=1e-6)
    _, keep = RIA().prune(w, {"norms": norms}, Unstructured(0.5))
    assert keep.tolist() == [[False, True], [False, True]]  # 2 > 1.10 and 2.48 > 1.67
