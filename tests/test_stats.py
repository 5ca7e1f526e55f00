"""Running input statistics (stats.py): norms, means, variance and the Hessian over batches."""

import torch

from llmprune.stats import Hessian, InputMeans, InputNorms, feature_variance

CPU = torch.device("cpu")


def test_statistics_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    norms = InputNorms(2, torch.device("cpu"))
    norms.add(x[:1])
    norms.add(x[1:])  # accumulation over batches equals one pass
    assert torch.allclose(norms.mean_sq, torch.tensor([35 / 3, 56 / 3]))
    h = Hessian(2, torch.device("cpu"))
    h.add(x.to(torch.bfloat16))  # any input dtype: fp32 per batch, summed over batches in fp64
    assert h.xtx.dtype == torch.float64 and h.matrix.dtype == torch.float32
    assert torch.allclose(h.matrix, 2 * x.T @ x / 3)


def test_means_and_variance_statistics():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 40, 6, generator=g) * 3 + 2
    norms, means = InputNorms(6, CPU), InputMeans(6, CPU)
    for batch in x.split(2):  # batches of different sizes
        norms.add(batch)
        means.add(batch)
    flat = x.reshape(-1, 6).double()
    assert torch.allclose(means.mean.double(), flat.mean(0), rtol=1e-6)
    assert torch.allclose(feature_variance(norms, means).double(), flat.var(0, unbiased=False), rtol=1e-5)
    assert means.tokens == 200 and means.tensors() == [means.total]
