"""Owned hooks (capture.py): what a block was called with, per-layer statistics by hand, shared inputs grouped,
and every hook and replaced forward gone after the context, an exception included."""

import pytest
import torch
from torch import nn

from llmprune.capture import BlockCall, StopForward, collect_statistics, record_block_calls
from llmprune.methods import Wanda
from llmprune.models import find_decoder, prunable_layers
from llmprune.runner import _run_block, capture_block_inputs

from .conftest import random_tokens, tiny_model

CPU = torch.device("cpu")


class SharedInput(nn.Module):
    """q and k read the same tensor x; o reads q(x) + k(x), which is 2x with identity weights."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.o, self.unused = (nn.Linear(3, 3, bias=False) for _ in range(4))
        for layer in (self.q, self.k, self.o):
            nn.init.eye_(layer.weight)

    def forward(self, x):
        return self.o(self.q(x) + self.k(x))


def layers_of(module):
    return {"q": module.q, "k": module.k, "o": module.o}


@torch.no_grad()
def test_statistics_by_hand_with_shared_inputs():
    module = SharedInput()
    with collect_statistics(layers_of(module), ("norms", "means"), stop_early=False) as col:
        for x in (torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 1.0, -1.0]])):
            module(x)
            col.end_call()
    assert col.groups() == {"q": ["q", "k"], "o": ["o"]}
    assert col.for_layer("k") is col.for_layer("q")  # one accumulator for the tensor both read
    q, o = col.for_layer("q"), col.for_layer("o")
    assert q["norms"].sum_sq.tolist() == [1.0, 5.0, 10.0] and q["norms"].tokens == 2
    assert q["means"].mean.tolist() == [0.5, 1.5, 1.0]
    assert o["norms"].sum_sq.tolist() == [4.0, 20.0, 40.0]  # (2x)^2


@torch.no_grad()
def test_forward_stops_once_every_layer_has_seen_its_input():
    module = SharedInput()
    with collect_statistics(layers_of(module), ("norms",)) as col:
        with pytest.raises(StopForward):
            module(torch.tensor([[1.0, 2.0, 3.0]]))
    assert col.for_layer("o")["norms"].sum_sq.tolist() == [4.0, 16.0, 36.0]  # the last layer's input was counted


@torch.no_grad()
def test_a_layer_without_input_has_no_statistics():
    module = SharedInput()
    with collect_statistics({**layers_of(module), "unused": module.unused}, ("norms",), stop_early=False) as col:
        module(torch.ones(1, 3))
    with pytest.raises(RuntimeError, match="layer unused received no calibration input"):
        col.for_layer("unused")


@torch.no_grad()
def test_statistics_hooks_are_removed_after_the_context_even_on_an_exception():
    module = SharedInput()
    layers = layers_of(module)
    with pytest.raises(ValueError, match="inside"):
        with collect_statistics(layers, ("norms",), stop_early=False) as col:
            assert all(len(layer._forward_pre_hooks) == 1 for layer in layers.values())
            raise ValueError("inside")
    assert all(len(layer._forward_pre_hooks) == 0 for layer in layers.values())
    module(torch.ones(1, 3))  # runs to the end and counts nothing
    assert col.stats == {}


@torch.no_grad()
def test_block_calls_recorded_by_hand():
    """Blocks are identities while recording; each call is kept without its hidden states."""
    blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    h = torch.tensor([[1.0, 2.0]])
    with record_block_calls(blocks) as record:
        out = blocks[0](h, "mask-0", position=0)
        out = blocks[1](hidden_states=out, position=1)
    assert torch.equal(out, h)
    assert len(record) == 2 and record[0] is h
    assert record[1] == [BlockCall(("mask-0",), {"position": 0}), BlockCall((), {"position": 1})]


@torch.no_grad()
def test_block_forwards_are_restored_after_recording_even_on_an_exception():
    blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    h = torch.tensor([[1.0, 2.0]])
    with pytest.raises(ValueError, match="inside"):
        with record_block_calls(blocks):
            assert torch.equal(blocks[0](h), h)
            raise ValueError("inside")
    for block in blocks:
        assert "forward" not in vars(block)
        assert torch.equal(block(h), h @ block.weight.T + block.bias)


def test_shared_inputs_grouped():
    model = tiny_model("llama", layers=1)
    _, blocks = find_decoder(model)
    hidden, calls = capture_block_inputs(model, random_tokens(2, 16), 2, CPU)
    with collect_statistics(prunable_layers(blocks[0]), Wanda.needs) as col:
        _run_block(blocks[0], hidden, {s: c[0] for s, c in calls.items()}, collector=col)
    groups = sorted(sorted(g) for g in col.groups().values())
    assert groups == [["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["self_attn.k_proj", "self_attn.q_proj",
                      "self_attn.v_proj"], ["self_attn.o_proj"]]
