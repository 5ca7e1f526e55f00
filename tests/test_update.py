"""The least-squares weight update after a mask (methods/update.py): never worse than masking, agrees with a
direct float64 solve, and keeps the mask through the runner."""

import pytest
import torch

import llmprune
from llmprune import NM, Unstructured, UsageError
from llmprune.methods import get_method
from llmprune.methods.update import exact_lsq, lsq_update, row_errors
from llmprune.patterns import select
from llmprune.stats import Hessian

from .conftest import random_tokens, tiny_model

CPU = torch.device("cpu")


def make_hessian(x):
    h = Hessian(x.shape[1], CPU)
    h.add(x)
    return h.matrix


@pytest.mark.parametrize("pattern,scope", [(Unstructured(0.5), "row"), (Unstructured(0.7), "matrix"), (NM(2, 4), "row")])
def test_update_never_increases_reconstruction_error(pattern, scope):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 32, generator=g) @ torch.randn(32, 32, generator=g)  # correlated inputs
    x[:, 3] = 0  # a dead input channel
    w = torch.randn(24, 32, generator=g)
    h = make_hessian(x)
    keep = select(w.abs() * x.norm(dim=0), pattern, scope)
    new = lsq_update(w, keep, h)
    assert torch.equal(new != 0, (new != 0) & keep)  # pruned stay exactly zero
    before = ((x @ (w * keep).T - x @ w.T) ** 2).sum(0)
    after = ((x @ new.T - x @ w.T) ** 2).sum(0)
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < 0.8 * before.sum()
    # the conjugate-gradient solve agrees with a direct float64 solve of the same system
    ref = exact_lsq(w, keep, h)
    assert torch.allclose(row_errors(new, w, h), row_errors(ref.float(), w, h), rtol=1e-3, atol=1e-4)


def test_update_method_needs_hessian_and_keeps_mask():
    m = get_method("wanda", update="lsq")
    assert m.name == "wanda+lsq" and set(m.needs) == {"norms", "hessian"}
    with pytest.raises(UsageError, match="--update"):
        get_method("wanda", update="obs")
    model = tiny_model("llama", layers=2)
    ref = tiny_model("llama", layers=2)
    tokens = random_tokens(4, 32)
    llmprune.prune(model, calib_tokens=tokens, method="wanda", pattern=NM(2, 4), update="lsq", device=CPU,
                   progress=False)
    llmprune.prune(ref, calib_tokens=tokens, method="wanda", pattern=NM(2, 4), device=CPU, progress=False)
    q, q_ref = model.model.layers[0].self_attn.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q == 0, q_ref == 0) and not torch.equal(q, q_ref)  # block 0 sees the same inputs
