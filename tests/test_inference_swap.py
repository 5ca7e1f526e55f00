"""Swapping a model's 2:4 Linears for (fused) sparse cores and back: on CPU with cuSPARSELt emulated, on the
GPU behind the gpu marker."""

import pytest
import torch

from llmprune import UsageError
from llmprune.inference import swap

from .conftest import pruned_24, random_tokens, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_swap_matches_dense_and_restores(emulated, arch):
    model = pruned_24(arch)
    ids = random_tokens(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        originals, plan = swap.sparsify(model, buckets=(32,), reps=1)
        plan.force = True
        emulated.calls = 0
        out = model(input_ids=ids).logits
    n_cores = len(swap.cores_of(model))
    # llama: qkv, o, gate+up, down; opt: qkv, out_proj, fc1, fc2 -> 4 cores in each of 2 blocks
    assert n_cores == 8
    assert emulated.calls == n_cores
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    swap.restore(originals)
    assert not swap.cores_of(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_refuses_model_without_2to4_layers(emulated):
    with pytest.raises(UsageError, match="no 2:4 Linear"):
        swap.sparsify(tiny_model("llama"))


@pytest.mark.gpu
@cuda
def test_gpu_model_matches_dense():
    model = pruned_24().to("cuda", torch.bfloat16)
    cfg = model.config
    ids = random_tokens(2, 40).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        _, plan = swap.sparsify(model, reps=1)
        plan.force = True
        out = model(input_ids=ids).logits.float()
    assert cfg.vocab_size == out.shape[-1]
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)
