"""Where architectures differ (models.py): the refusal of a model without a decoder block list."""

import pytest
import torch

import llmprune
from llmprune import UsageError

CPU = torch.device("cpu")


def test_unsupported_architecture():
    class NotAnLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)

    with pytest.raises(UsageError, match="unsupported architecture NotAnLM"):
        llmprune.prune(NotAnLM(), method="magnitude", device=CPU, progress=False)
