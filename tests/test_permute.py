"""N:M input-channel permutation (permute.py): against an exhaustive search, by hand, the model's function
unchanged, and every layer of a pruned model exactly N:M in the order the permutation chose."""

import itertools

import pytest
import torch

import llmprune
from llmprune import NM, Unstructured, UsageError, permute
from llmprune.methods import get_method
from llmprune.models import find_decoder
from llmprune.patterns import select
from llmprune.permute import nm_permutation, permuted_nm_select, retained

from .conftest import linear_weights, random_tokens, tiny_model

CPU = torch.device("cpu")


def best_nm_retained(scores, pattern):
    cols = scores.shape[1]
    best = 0.0
    for first in itertools.combinations(range(1, cols), pattern.m - 1):  # 8 columns, 2 groups
        g1 = [0, *first]
        perm = torch.tensor(g1 + [c for c in range(cols) if c not in g1])
        best = max(best, retained(scores, pattern, perm))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_permutation_valid_never_worse_and_nm_in_permuted_order(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(6, 8, generator=g) * torch.rand(8, generator=g) ** 2
    pattern = NM(2, 4)
    perm = nm_permutation(scores, pattern)
    assert sorted(perm.tolist()) == list(range(8))
    got = retained(scores, pattern, perm)
    assert retained(scores, pattern) <= got <= best_nm_retained(scores, pattern) + 1e-5
    keep = permuted_nm_select(scores, pattern)
    assert (keep[:, perm].reshape(6, 2, 4).sum(-1) == 2).all()
    assert float((scores * keep).sum()) == pytest.approx(got)


def test_permutation_finds_the_better_grouping():
    # the two large columns sit in the same group: 1:2 can keep only one of them unless they are separated
    scores = torch.tensor([[9.0, 8.0, 1.0, 1.0]])
    perm = nm_permutation(scores, NM(1, 2))
    assert retained(scores, NM(1, 2)) == 10.0 and retained(scores, NM(1, 2), perm) == 17.0
    # mapped back to the stored order the mask keeps both large columns: 1:2 only in the permuted order
    assert permuted_nm_select(scores, NM(1, 2)).tolist() == [[True, True, False, False]]


@torch.no_grad()
def test_permutation_leaves_the_model_function_unchanged():
    """Physically permuting the MLP's hidden channels (gate/up rows, down columns) changes nothing; and the
    mask chosen on permuted channels and mapped back computes what the physically permuted N:M model does."""
    model = tiny_model("llama", layers=1)
    mlp = find_decoder(model)[1][0].mlp
    x = torch.randn(3, 5, 32)
    ref = mlp(x)
    scores = torch.rand(32, 64)
    perm = nm_permutation(scores, NM(2, 4))
    assert not torch.equal(perm, torch.arange(64))
    permuted = type(mlp)(model.config)
    permuted.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
    permuted.up_proj.weight.copy_(mlp.up_proj.weight[perm])
    permuted.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    assert torch.allclose(permuted(x), ref, atol=1e-6)
    keep = permuted_nm_select(scores, NM(2, 4))
    mlp.down_proj.weight.mul_(keep)
    hw_mask = select(scores[:, perm], NM(2, 4))  # N:M in the permuted (stored) order
    permuted.down_proj.weight.mul_(hw_mask)
    assert torch.allclose(permuted(x), mlp(x), atol=1e-6)


def test_ria_permute_prunes_every_layer_to_exact_nm_count(monkeypatch):
    """--permute keeps the weights where they are and maps the mask back, so a layer is N:M in the column
    order ``nm_permutation`` chose for it (position p holds stored column perm[p]), not in the stored order.
    The order of each layer is recorded as it is chosen and the exact count is checked in that order."""
    perms = []
    choose = permute.nm_permutation

    def recording(scores, pattern, *args, **kwargs):
        perm = choose(scores, pattern, *args, **kwargs)
        perms.append(perm)
        return perm

    monkeypatch.setattr(permute, "nm_permutation", recording)
    model = tiny_model("llama", layers=2)
    llmprune.prune(model, calib_tokens=random_tokens(4, 32), method="ria", pattern=NM(2, 4), permute=True,
                   device=CPU, progress=False)
    weights = linear_weights(model)
    assert len(perms) == len(weights) == 2 * 7  # one order per pruned Linear, in pruning order
    nm_as_stored = 0
    for (name, w), perm in zip(weights.items(), perms):
        rows, cols = w.shape
        assert sorted(perm.tolist()) == list(range(cols)), name
        assert ((w[:, perm] == 0).reshape(rows, cols // 4, 4).sum(-1) == 2).all(), name  # exactly 2 of every 4
        nm_as_stored += bool(((w == 0).reshape(rows, cols // 4, 4).sum(-1) == 2).all())
    assert nm_as_stored < len(weights)  # the order matters: some layers are not 2:4 as stored


def test_permute_is_refused_where_it_cannot_apply():
    with pytest.raises(UsageError, match="--permute"):
        get_method("sparsegpt", permute=True)
    with pytest.raises(UsageError, match="--permute only"):
        llmprune.prune(tiny_model("llama", layers=2), method="magnitude", pattern=Unstructured(0.5), permute=True,
                       device=CPU, progress=False)
