"""Owned hooks (capture.py): layers that read the same input share one accumulator."""

import torch

from llmprune.capture import collect_statistics
from llmprune.methods import Wanda
from llmprune.models import find_decoder, prunable_layers
from llmprune.runner import _run_block, capture_block_inputs

from .conftest import random_tokens, tiny_model

CPU = torch.device("cpu")


def test_shared_inputs_grouped():
    model = tiny_model("llama", layers=1)
    _, blocks = find_decoder(model)
    hidden, calls = capture_block_inputs(model, random_tokens(2, 16), 2, CPU)
    with collect_statistics(prunable_layers(blocks[0]), Wanda.needs) as col:
        _run_block(blocks[0], hidden, {s: c[0] for s, c in calls.items()}, collector=col)
    groups = sorted(sorted(g) for g in col.groups().values())
    assert groups == [["mlp.down_proj"], ["mlp.gate_proj", "mlp.up_proj"], ["self_attn.k_proj", "self_attn.q_proj",
                      "self_attn.v_proj"], ["self_attn.o_proj"]]
