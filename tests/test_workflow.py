"""The run's steps apart from the command line: where the weights go."""

import pytest
import torch

from llmprune import UsageError, workflow

def test_weights_placement_moves_the_whole_model_only_when_it_fits(monkeypatch):
    from llmprune import devices

    from .conftest import random_tokens, tiny_model

    gpu = torch.device("cuda", 0)  # a label: the move is recorded, nothing is allocated
    model, tokens = tiny_model("llama"), random_tokens(4, 16)
    moved = []
    monkeypatch.setattr(model, "to", lambda dev: moved.append(dev))
    monkeypatch.setattr(devices, "cpu_free_bytes", lambda: None)
    monkeypatch.setattr(devices, "free_bytes", lambda dev: 1 << 40)
    assert workflow.place_weights(model, "auto", gpu, tokens, 2, ("norms",), "auto") == "gpu" and moved == [gpu]
    assert workflow.place_weights(model, "cpu", gpu, tokens, 2, ("norms",), "auto") == "cpu" and len(moved) == 1
    monkeypatch.setattr(devices, "free_bytes", lambda dev: 1000)  # less than the model itself
    assert workflow.place_weights(model, "auto", gpu, tokens, 2, ("norms",), "auto") == "cpu" and len(moved) == 1
    with pytest.raises(UsageError, match="--weights gpu: the model .* do not fit on cuda:0 together; use --weights cpu"):
        workflow.place_weights(model, "gpu", gpu, tokens, 2, ("norms",), "auto")
    assert workflow.place_weights(model, "auto", torch.device("cpu"), tokens, 2, ("norms",), "auto") == "cpu"


