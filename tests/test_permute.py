"""N:M input-channel permutation (permute.py): against an exhaustive search, by hand, the model's function
unchanged, every layer of a pruned model exactly N:M in the order the permutation chose, and that order
recorded per Linear by the runner (through the modifiers and a resumed checkpoint)."""

import itertools
import json

import pytest
import torch

import llmprune
from llmprune import NM, Unstructured, UsageError, permute
from llmprune.methods import get_method
from llmprune.models import find_decoder
from llmprune.patterns import select
from llmprune.permute import (is_order, nm_permutation, order_from_text, order_to_text, permuted_nm_mask,
                              permuted_nm_select, retained, stored_order)
from llmprune.runner import LayerResult

from .conftest import linear_weights, norms_of, random_tokens, tiny_model

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


def recording_orders(monkeypatch) -> list:
    """Every order ``nm_permutation`` returns from now on, in the order it is called."""
    perms = []
    choose = permute.nm_permutation

    def recording(scores, pattern, *args, **kwargs):
        perm = choose(scores, pattern, *args, **kwargs)
        perms.append(perm)
        return perm

    monkeypatch.setattr(permute, "nm_permutation", recording)
    return perms


@pytest.mark.parametrize("modifiers", [{}, {"update": "lsq"}, {"refine": "dsnot"}], ids=["ria", "ria+lsq", "ria+dsnot"])
def test_ria_permute_prunes_every_layer_to_exact_nm_count(monkeypatch, modifiers):
    """--permute keeps the weights where they are and maps the mask back, so a layer is N:M in the column
    order ``nm_permutation`` chose for it (position p holds stored column perm[p]), not in the stored order.
    The order of each layer is recorded as it is chosen and the exact count is checked in that order; the
    result holds the same order per Linear (through the update and the refinement too)."""
    perms = recording_orders(monkeypatch)
    model = tiny_model("llama", layers=2)
    res = llmprune.prune(model, calib_tokens=random_tokens(4, 32), method="ria", pattern=NM(2, 4), permute=True,
                         device=CPU, progress=False, **modifiers)
    weights = linear_weights(model)
    assert len(perms) == len(weights) == 2 * 7  # one order per pruned Linear, in pruning order
    recorded = res.permutations()
    assert list(recorded) == [r.name for r in res.layers]  # no layer kept the identity here
    nm_as_stored = 0
    for (name, w), perm, layer in zip(weights.items(), perms, res.layers):
        rows, cols = w.shape
        assert sorted(perm.tolist()) == list(range(cols)), name
        assert ((w[:, perm] == 0).reshape(rows, cols // 4, 4).sum(-1) == 2).all(), name  # exactly 2 of every 4
        assert layer.perm.dtype == torch.int64 and torch.equal(layer.perm, perm), name
        nm_as_stored += bool(((w == 0).reshape(rows, cols // 4, 4).sum(-1) == 2).all())
    assert nm_as_stored < len(weights)  # the order matters: some layers are not 2:4 as stored


def test_masks_and_weights_are_those_of_the_unrecorded_selection():
    """Recording the order changes nothing pruned: the mask is ``permuted_nm_select``'s, the weight w * mask."""
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(8, 16, generator=g)
    keep, perm = permuted_nm_mask(scores, NM(2, 4))
    assert torch.equal(keep, permuted_nm_select(scores, NM(2, 4))) and torch.equal(perm, nm_permutation(scores, NM(2, 4)))
    from llmprune.methods import RIA

    w = torch.randn(8, 16, generator=g)
    stats = {"norms": norms_of([1.0 + i for i in range(16)])}
    pruned = RIA(permute=True).prune_ordered(w, stats, NM(2, 4))
    assert torch.equal(RIA(permute=True).prune(w, stats, NM(2, 4))[0], pruned.weight)
    assert torch.equal(pruned.keep, permuted_nm_select(RIA().score(w, stats), NM(2, 4)))
    assert RIA().prune_ordered(w, stats, NM(2, 4)).perm is None  # without --permute: the stored order


def test_an_identity_order_is_recorded_as_none():
    assert stored_order(None) is None and stored_order(torch.arange(8)) is None
    assert stored_order(torch.tensor([1, 0, 2, 3], dtype=torch.int32)).tolist() == [1, 0, 2, 3]
    scores = torch.tensor([[9.0, 1.0, 8.0, 1.0]])  # 1:2 keeps 9 and 8 as stored: no order beats the identity
    assert torch.equal(nm_permutation(scores, NM(1, 2)), torch.arange(4))


def test_orders_are_checked_and_round_trip_as_text():
    assert is_order(torch.tensor([2, 0, 1]), 3)
    for bad in (torch.tensor([0, 0, 1]), torch.tensor([0, 1]), torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]])):
        assert not is_order(bad, 3)
    for cols in (8, 2**15, 2**15 + 4):  # int16 up to 32768 columns, int32 beyond
        perm = torch.randperm(cols, generator=torch.Generator().manual_seed(cols))
        text = order_to_text(perm)
        assert torch.equal(order_from_text(text, cols), perm)
        assert len(text) == -(-cols * (2 if cols <= 2**15 else 4) // 3) * 4
    with pytest.raises(ValueError, match="not a permutation of 4 columns"):
        order_from_text(order_to_text(torch.tensor([0, 1, 1, 2])), 4)


def test_a_layer_result_round_trips_through_its_record():
    for perm in (None, torch.tensor([3, 1, 0, 2])):
        r = LayerResult("model.layers.0.mlp.down_proj", (2, 4), 4, ["a note"], perm)
        record = r.to_record()
        assert json.loads(json.dumps(record)) == record  # what the checkpoint's state.json holds
        back = LayerResult.from_record(record)
        assert (back.name, back.shape, back.zeros, back.warnings) == (r.name, r.shape, r.zeros, r.warnings)
        assert (back.perm is None) if perm is None else torch.equal(back.perm, perm)
    old = {"name": "x", "shape": [2, 4], "zeros": 4, "warnings": []}  # written before orders were recorded
    assert LayerResult.from_record(old).perm is None


def test_a_resumed_run_has_the_orders_of_its_finished_blocks(tmp_path, monkeypatch):
    """The orders of blocks finished before a crash come back from the checkpoint's state, equal to a whole run's."""
    from llmprune.checkpoint import Checkpoint

    tokens = random_tokens(4, 32)

    def run(work):
        return llmprune.prune(tiny_model("llama", layers=3), calib_tokens=tokens, method="ria", pattern="2:4",
                              permute=True, device=CPU, progress=False, checkpoint_dir=work)

    whole = run(None).permutations()
    original = Checkpoint.save

    def save(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 1:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "save", save)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "work")
    resumed = run(tmp_path / "work")
    assert resumed.resumed_from_block == 2
    assert list(resumed.permutations()) == list(whole)
    assert all(torch.equal(resumed.permutations()[k], whole[k]) for k in whole)


def test_permute_is_refused_where_it_cannot_apply():
    with pytest.raises(UsageError, match="--permute"):
        get_method("sparsegpt", permute=True)
    with pytest.raises(UsageError, match="--permute only"):
        llmprune.prune(tiny_model("llama", layers=2), method="magnitude", pattern=Unstructured(0.5), permute=True,
                       device=CPU, progress=False)


def test_a_damaged_recorded_order_is_refused_by_the_resume(tmp_path, monkeypatch):
    from llmprune.checkpoint import STATE_NAME, Checkpoint

    work = tmp_path / "work"
    original = Checkpoint.save

    def save(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == 0:
            raise KeyboardInterrupt

    def run():
        llmprune.prune(tiny_model("llama", layers=2), calib_tokens=random_tokens(4, 32), method="ria", pattern="2:4",
                       permute=True, device=CPU, progress=False, checkpoint_dir=work)

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "save", save)
        with pytest.raises(KeyboardInterrupt):
            run()
    state = json.loads((work / STATE_NAME).read_text())
    state["layers"][0]["perm"] = order_to_text(torch.zeros(32, dtype=torch.int64))  # a column 32 times
    (work / STATE_NAME).write_text(json.dumps(state))
    with pytest.raises(UsageError, match="is damaged .*not a permutation of 32 columns.*delete that folder"):
        run()
