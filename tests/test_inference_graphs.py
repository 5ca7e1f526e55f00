"""Greedy decoding over a static cache: the same step eagerly on CPU (cuSPARSELt emulated), as CUDA-graph
replays behind the gpu marker."""

import pytest
import torch

from llmprune import UsageError
from llmprune.inference import graphs, swap

from .conftest import pruned_24, random_tokens

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def greedy_dynamic(model, ids, steps):
    kw = graphs.cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    cache, tok = getattr(out, kw), out.logits[:, -1:].argmax(-1)
    toks = [tok]
    for _ in range(steps):
        out = model(input_ids=tok, use_cache=True, **{kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
        toks.append(tok)
    return torch.cat(toks, 1), out.logits[:, -1]


def test_static_decoder_matches_dynamic_cache_decode(emulated):
    model = pruned_24()
    ids = random_tokens(2, 12)
    with torch.no_grad():
        ref, ref_logits = greedy_dynamic(model, ids, 6)
        dec = graphs.StaticDecoder(model, ids, max_len=24, graph=False)
        assert torch.equal(dec.generate(6), ref)
        torch.testing.assert_close(dec.logits, ref_logits)
        _, plan = swap.sparsify(model, buckets=(8,), reps=1)
        plan.force = True  # the emulated sparse kernel in every Linear, fused q/k/v and gate/up
        emulated.calls = 0
        dec = graphs.StaticDecoder(model, ids, max_len=24, plan=plan, graph=False)
        assert torch.equal(dec.generate(6), ref)
        assert emulated.calls == 8 * 7  # prefill + 6 steps, 8 cores each


def test_static_decoder_refuses_a_cache_too_small(emulated):
    model = pruned_24()
    with pytest.raises(UsageError, match="max_len"):
        graphs.StaticDecoder(model, random_tokens(1, 10), max_len=10, graph=False)
    dec = graphs.StaticDecoder(model, random_tokens(1, 10), max_len=12, graph=False)
    dec.step(), dec.step()
    with pytest.raises(UsageError, match="full"):
        dec.step()


@pytest.mark.gpu
@cuda
def test_gpu_graph_decode_of_dense_model_matches_dynamic_cache():
    model = pruned_24().to("cuda")
    model.set_attn_implementation("sdpa")  # "eager" attention copies a host scalar into its mask: no capture  # float32: the same greedy tokens expected
    ids = random_tokens(2, 16).cuda()
    with torch.no_grad():
        ref, _ = greedy_dynamic(model, ids, 10)
        out = graphs.StaticDecoder(model, ids, max_len=40).generate(8)
    assert out.shape == ref.shape and torch.equal(out, ref)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("force", [False, True])
def test_gpu_graph_decode_matches_eager_and_keeps_its_captured_dispatch(force):
    model = pruned_24().to("cuda", torch.bfloat16)
    model.set_attn_implementation("sdpa")
    ids = random_tokens(2, 16).cuda()
    with torch.no_grad():
        _, plan = swap.sparsify(model, buckets=(8, 32), reps=1)
        plan.force = force
        eager = graphs.StaticDecoder(model, ids, max_len=40, plan=plan, graph=False)
        eager_tokens = eager.generate(10)
        graph = graphs.StaticDecoder(model, ids, max_len=40, plan=plan, graph=True)
        plan.force = not force  # a replay runs what was chosen at capture: the plan is not consulted again
        graph_tokens = graph.generate(8)
    assert torch.equal(graph_tokens, eager_tokens)
    torch.testing.assert_close(graph.logits, eager.logits, rtol=0, atol=0)
