"""GPU-only checks (``pytest -m gpu``); skipped where no CUDA GPU is visible."""

import pytest
import torch

import llmprune
from llmprune import NM, Unstructured
from llmprune.methods import SparseGPT

from .conftest import linear_weights, random_tokens, tiny_model
from .test_sparsegpt import _reference, problem

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
GPU = torch.device("cuda")


@pytest.mark.parametrize("pattern", [Unstructured(0.5), NM(2, 4)])
def test_sparsegpt_batched_solve_on_gpu_matches_the_column_loop(pattern):
    w, _, stats = problem(rows=64, cols=256, tokens=4096, seed=5)
    ref_w, ref_keep = _reference(w, stats["hessian"], pattern)
    stats["hessian"].xtx = stats["hessian"].xtx.to(GPU)
    new_w, keep = SparseGPT().prune(w.to(GPU), stats, pattern)
    assert torch.equal(keep.cpu(), ref_keep)
    assert torch.allclose(new_w.cpu(), ref_w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_offloaded_activations_give_the_same_model(method):
    tokens = random_tokens(6, 32)
    results = []
    for activations in ("gpu", "cpu"):
        model = tiny_model("llama", layers=2)
        res = llmprune.prune(model, calib_tokens=tokens, method=method, pattern=Unstructured(0.5), device=GPU,
                             batch_size=2, progress=False, activations=activations)
        assert res.memory_estimate["activations"] == ("cpu" if activations == "cpu" else "cuda")
        results.append(linear_weights(model))
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (8, 16)])
def test_nm_masks_on_the_gpu_equal_the_cpu_sort(n, m):
    """The GPU's comparison ranks (M <= 8) and its sort (M = 16) choose the CPU's masks, ties included."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (512, 1024), generator=gen).float()
    assert torch.equal(llmprune.select(scores.cuda(), NM(n, m)).cpu(), llmprune.select(scores, NM(n, m)))
