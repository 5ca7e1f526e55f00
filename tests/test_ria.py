"""RIA (methods/ria.py): the score of a 2x2 layer by hand, its default comparison over the whole matrix against
the per-row choice, --scope through the API. Its --permute runs are in test_permute.py."""

import pytest
import torch

import llmprune
from llmprune import NM, Unstructured, UsageError
from llmprune.methods import RIA
from llmprune.stats import InputNorms

from .conftest import random_tokens, tiny_model

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


def test_ria_compares_over_the_matrix_by_default():
    # ||X|| = 1. Row sums 3, 12; column sums 5, 10. Scores: 1/3 + 1/5 = 0.533, 2/3 + 2/10 = 0.867,
    # 4/12 + 4/5 = 1.133, 8/12 + 8/10 = 1.467. The matrix (the RIA code's default) prunes row 0 entirely;
    # per row (its --per_outneuron) one weight of each row goes.
    w = torch.tensor([[1.0, 2.0], [4.0, 8.0]])
    norms = InputNorms(2, CPU)
    norms.add(torch.tensor([[1.0, 1.0]]))
    assert RIA.default_scope == "matrix"
    _, keep = RIA().prune(w, {"norms": norms}, Unstructured(0.5))
    assert keep.tolist() == [[False, False], [True, True]]
    _, keep = RIA().prune(w, {"norms": norms}, Unstructured(0.5, "row"))
    assert keep.tolist() == [[False, True], [False, True]]


def test_scope_through_the_api():
    tokens = random_tokens(4, 32)
    runs = {}
    for scope in (None, "matrix", "row"):
        model = tiny_model("llama", layers=2)
        res = llmprune.prune(model, calib_tokens=tokens, method="ria", sparsity=0.5, scope=scope, device=CPU,
                             progress=False)
        q = model.model.layers[0].self_attn.q_proj.weight
        runs[scope] = (q == 0).sum(dim=1)
        assert res.pattern == Unstructured(0.5, scope) and int((q == 0).sum()) == q.numel() // 2
    assert torch.equal(runs[None], runs["matrix"]) and not torch.equal(runs["matrix"], runs["row"])
    assert (runs["row"] == q.shape[1] // 2).all()  # exactly half of every row
    with pytest.raises(UsageError, match="--scope applies to unstructured sparsity; drop --scope with --pattern 2:4"):
        llmprune.prune(tiny_model("llama"), calib_tokens=tokens, method="ria", pattern=NM(2, 4), scope="row",
                       device=CPU, progress=False)
