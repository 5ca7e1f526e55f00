"""Running input statistics (stats.py): sums over batches by hand, fp64 totals, means and variance, the Hessian."""

import torch

from llmprune.stats import Hessian, InputMeans, InputNorms, feature_variance

CPU = torch.device("cpu")


def test_input_norms_over_two_batches_equal_the_norms_of_their_concatenation():
    a = torch.tensor([[1.0, -2.0, 3.0]])  # a 2x3 input (2 tokens, 3 features) in two batches of one token
    b = torch.tensor([[4.0, 0.5, -1.0]])
    norms = InputNorms(3, CPU)
    norms.add(a)
    norms.add(b)
    # sums of squares per feature: 1 + 16, 4 + 0.25, 9 + 1; means over the 2 tokens
    assert norms.tokens == 2
    assert norms.sum_sq.tolist() == [17.0, 4.25, 10.0]
    assert norms.mean_sq.tolist() == [8.5, 2.125, 5.0]
    whole = InputNorms(3, CPU)
    whole.add(torch.cat([a, b]).reshape(1, 2, 3))  # [batch, seq, features], as a block's Linear sees it
    assert whole.tokens == 2 and torch.equal(whole.total, norms.total)


def test_totals_over_batches_are_float64_so_the_batch_order_does_not_matter():
    # 4096^2 = 2^24, where float32 steps by 2: summed in float32, 2^24 + 1 + 1 gives 2^24 and 1 + 1 + 2^24 gives
    # 2^24 + 2; the fp64 total is 2^24 + 2 in either order
    forward, backward = InputNorms(1, CPU), InputNorms(1, CPU)
    for x in (4096.0, 1.0, 1.0):
        forward.add(torch.tensor([[x]]))
    for x in (1.0, 1.0, 4096.0):
        backward.add(torch.tensor([[x]]))
    assert forward.total.dtype == torch.float64
    assert forward.total.item() == backward.total.item() == 2.0**24 + 2
    h = Hessian(1, CPU)
    for x in (4096.0, 1.0, 1.0):
        h.add(torch.tensor([[x]]))
    assert h.xtx.dtype == torch.float64 and h.xtx.item() == 2.0**24 + 2 and h.tokens == 3


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


def test_means_and_variance_by_hand():
    # feature 0 sees 1, 3 (mean 2, variance 1); feature 1 sees 2, 2 (mean 2, variance 0)
    norms, means = InputNorms(2, CPU), InputMeans(2, CPU)
    for x in (torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 2.0]])):
        norms.add(x)
        means.add(x)
    assert means.mean.tolist() == [2.0, 2.0]
    assert feature_variance(norms, means).tolist() == [1.0, 0.0]


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
