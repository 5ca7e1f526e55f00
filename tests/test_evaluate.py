import math
from types import SimpleNamespace

import pytest
import torch

from llmprune.evaluate import nll_from_logits, perplexity, perplexity_from_nll, windows_of


class Uniform(torch.nn.Module):
    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_uniform_logits_give_vocabulary_size():
    wins = windows_of(torch.randint(0, 50, (1000,)), 16)
    result = perplexity(Uniform(50), wins, torch.device("cpu"), batch_size=7, progress=False)
    assert result.perplexity == pytest.approx(50.0, rel=1e-6)  # fp32 log-softmax
    assert result.windows == 62 and result.seqlen == 16


def test_windows_non_overlapping_and_limited():
    stream = torch.arange(100)
    w = windows_of(stream, 10, max_windows=3)
    assert w.tolist()[1] == list(range(10, 20)) and w.shape == (3, 10)
    assert windows_of(stream, 10).shape == (10, 10)


def test_bos_windows():
    stream = torch.tensor([1, 5, 6, 7, 8, 9, 10])  # a tokenizer's own leading BOS (id 1) is dropped
    w = windows_of(stream, 3, bos_id=1)
    assert w.tolist() == [[1, 5, 6], [1, 7, 8], [1, 9, 10]]


def test_nll_hand_computed():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p(1 | first) = 3/4
    nll = nll_from_logits(logits, torch.tensor([[0, 1]]))
    assert nll.item() == pytest.approx(-math.log(0.75))
    # the mean of window losses, exponentiated (the reference's sum(loss*seqlen)/(n*seqlen))
    assert perplexity_from_nll(torch.tensor([1.0, 3.0])) == pytest.approx(math.exp(2.0))
