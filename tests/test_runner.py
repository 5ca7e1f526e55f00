"""The block-by-block engine on tiny models, checked against a plain second implementation."""

import pytest
import torch

import llmprune
from llmprune import NM, Unstructured, UsageError
from llmprune.methods import SparseGPT
from llmprune.models import find_decoder, prunable_layers, weight_matrix
from llmprune.runner import _run_block, capture_block_inputs

from .conftest import ARCHS, linear_weights, random_tokens, tiny_model

CPU = torch.device("cpu")


@torch.no_grad()
def reference_wanda(model, tokens, sparsity):
    """Plain Wanda: for each block, one whole-model forward with the blocks before it already pruned,
    hooks on the block's Linears, then prune the block. Independent of the runner's capture/propagation."""
    _, blocks = find_decoder(model)
    for block in blocks:
        layers = prunable_layers(block)
        sums = {n: 0 for n in layers}
        counts = {n: 0 for n in layers}

        def hook(name):
            def fn(mod, args):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums[name] + (x * x).sum(0)
                counts[name] += x.shape[0]
            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
        model(input_ids=tokens)
        for h in handles:
            h.remove()
        for n, m in layers.items():
            w = weight_matrix(m)
            score = w.abs() * (sums[n] / counts[n]).sqrt().float()
            k = int(w.shape[1] * sparsity)
            idx = torch.sort(score, dim=1, stable=True).indices[:, :k]
            w.scatter_(1, idx, 0.0)


def test_wanda_matches_plain_reference_with_propagation():
    tokens = random_tokens(6, 32)
    ours, ref = tiny_model("llama", layers=3), tiny_model("llama", layers=3)
    llmprune.prune(ours, calib_tokens=tokens, method="wanda", pattern=Unstructured(0.5), device=CPU, batch_size=4,
                   progress=False)
    reference_wanda(ref, tokens, 0.5)
    a, b = linear_weights(ours), linear_weights(ref)
    for name in a:
        assert torch.equal(a[name] == 0, b[name] == 0), name


@torch.no_grad()
def test_propagation_uses_pruned_outputs():
    """Block 1 is calibrated on block 0's output computed with block 0's pruned weights, not its dense ones.
    Second path: the model's own forward after the run, whose hidden state after block 0 uses the pruned weights."""
    tokens = random_tokens(4, 32)
    model = tiny_model("llama", layers=2)
    _, blocks = find_decoder(model)
    dense = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states[1]
    seen = []  # block 1's hidden input, as its first module receives it from the runner
    handle = blocks[1].input_layernorm.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    llmprune.prune(model, calib_tokens=tokens, method="wanda", pattern=Unstructured(0.5), device=CPU, batch_size=2,
                   progress=False)
    handle.remove()
    assert len(seen) == 2  # one statistics pass over 2 batches; the last block's output is not propagated
    captured = torch.cat(seen)
    pruned = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states[1]
    assert torch.allclose(captured, pruned, atol=1e-5)
    assert (captured - dense).abs().max() > 100 * 1e-5  # measured: 1.3e-2 from the dense output, 0 from the pruned


@pytest.mark.parametrize("arch", ARCHS)
def test_runner_reproduces_the_models_own_forward(arch):
    """Captured block calls + propagation give exactly the model's own per-block hidden states."""
    model = tiny_model(arch, layers=2)
    tokens = random_tokens(3, 40)
    with torch.no_grad():
        expected = model(input_ids=tokens, output_hidden_states=True, use_cache=False).hidden_states
        hidden, calls = capture_block_inputs(model, tokens, 2, CPU)
        assert torch.allclose(torch.cat(hidden), expected[0], atol=1e-6)
        _, blocks = find_decoder(model)
        _run_block(blocks[0], hidden, {s: c[0] for s, c in calls.items()})
    assert torch.allclose(torch.cat(hidden), expected[1], atol=1e-5)


def assert_exact_zeros(w, method, pattern, name):
    """The count every pruned Linear must have, in each of its comparison groups."""
    rows, cols = w.shape
    zeros = w == 0
    if isinstance(pattern, NM):  # m - n zeros in every group of m consecutive weights of a row
        assert (zeros.reshape(rows, cols // pattern.m, pattern.m).sum(-1) == pattern.m - pattern.n).all(), name
    elif method == "sparsegpt":  # across each column block of 128; every layer here is one block
        assert cols <= SparseGPT().blocksize, name
        assert int(zeros.sum()) == int(rows * cols * pattern.sparsity), name
    else:  # row scope
        assert (zeros.sum(1) == int(cols * pattern.sparsity)).all(), name


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method,pattern", [("wanda", NM(2, 4)), ("sparsegpt", Unstructured(0.5)), ("magnitude", NM(1, 4)),
                                            ("wanda", Unstructured(0.3))])
def test_architectures(arch, method, pattern):
    model = tiny_model(arch)
    head = model.get_output_embeddings().weight.clone()
    embed = model.get_input_embeddings().weight.clone()
    res = llmprune.prune(model, calib_tokens=random_tokens(4, 32), method=method, pattern=pattern, device=CPU,
                         progress=False)
    weights = linear_weights(model)
    assert len(res.layers) == len(weights)
    for layer, (name, w) in zip(res.layers, weights.items()):
        assert layer.name.endswith(name.split(".", 1)[1]) and layer.zeros == int((w == 0).sum()), (layer.name, name)
        assert_exact_zeros(w, method, pattern, layer.name)
    assert torch.equal(model.get_output_embeddings().weight, head)
    assert torch.equal(model.get_input_embeddings().weight, embed)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=random_tokens(1, 16), use_cache=False).logits).all()


def test_nm_groups_in_every_layer():
    model = tiny_model("llama")
    llmprune.prune(model, calib_tokens=random_tokens(4, 32), method="wanda", pattern=NM(1, 4), device=CPU, progress=False)
    for name, w in linear_weights(model).items():
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 1).all(), name


def test_untied_lm_head_untouched():
    model = tiny_model("llama")
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    head = model.lm_head.weight.clone()
    llmprune.prune(model, calib_tokens=random_tokens(2, 16), device=CPU, progress=False)
    assert torch.equal(model.lm_head.weight, head)


def test_statistics_count_every_calibration_token(monkeypatch):
    """--nsamples is honoured: every Linear's statistic sees nsamples x seqlen tokens, no more, no less."""
    from llmprune import stats

    seen = []
    original = stats.InputNorms.add

    def counting(self, x):
        seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        original(self, x)

    monkeypatch.setattr(stats.InputNorms, "add", counting)
    model = tiny_model("llama", layers=1)
    llmprune.prune(model, calib_tokens=random_tokens(5, 24), device=CPU, batch_size=2, progress=False)
    # 4 distinct inputs in a Llama block (q/k/v share one, o, gate/up share one, down), 3 batches of <=2 windows
    assert sum(seen) == 4 * 5 * 24
    assert len(seen) == 4 * 3


def test_magnitude_runs_no_forward(monkeypatch):
    model = tiny_model("llama")
    _, blocks = find_decoder(model)

    def boom(*a, **k):
        raise AssertionError("magnitude must not run the model")

    monkeypatch.setattr(type(blocks[0]), "forward", boom)
    res = llmprune.prune(model, method="magnitude", pattern=Unstructured(0.5), device=CPU, progress=False)
    assert res.calibration is None
    assert abs(res.sparsity_overall - 0.5) < 1e-9


def test_nm_must_divide_every_layer():
    with pytest.raises(UsageError, match="M=3 does not divide"):
        llmprune.prune(tiny_model("llama"), method="magnitude", pattern=NM(2, 3), device=CPU, progress=False)


def test_seqlen_longer_than_context():
    model = tiny_model("llama")
    with pytest.raises(UsageError, match="longer than the model's context of 256"):
        llmprune.prune(model, calib_tokens=random_tokens(1, 300), device=CPU, progress=False)
