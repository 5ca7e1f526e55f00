"""The activation store: the runner's list of per-batch hidden states."""

import torch

from llmprune.activations import ActivationStore


def test_a_batch_written_back_reuses_its_buffer():
    """Rebinding each batch to the block's fresh output left the CPU heap at about 1.5 copies of the
    activations (benchmarks/cpu_memory.py); the store now copies into the buffer it holds."""
    store = ActivationStore(torch.device("cpu"))
    first = torch.zeros(2, 3, 4)
    store.append(first)
    new = torch.arange(24.0).reshape(2, 3, 4)
    store[0] = new
    assert store[0].data_ptr() == first.data_ptr() and torch.equal(store[0], new)
    other = torch.ones(1, 3, 4)  # another shape (a last, smaller batch): kept as given
    store[0] = other
    assert store[0] is other and len(store) == 1
