"""Per-block sparsity (layerwise.py): OWL's two mappings (the paper's min-max, the llmprune band) by hand, outlier ratios against a second
path, block sizes by hand, parsing of --layerwise, and a per-block list through the runner."""

import json

import pytest
import torch

import llmprune
from llmprune import NM, Unstructured, UsageError
from llmprune.layerwise import OWL, block_outlier_ratios, block_sizes, owl_sparsities, outlier_ratio, parse_layerwise
from llmprune.models import find_decoder, prunable_layers, weight_matrix

from .conftest import random_tokens, tiny_model

CPU = torch.device("cpu")


def test_owl_hand_example():
    # mean ratio 0.03, deviations (-0.02, -0.01, 0.03, 0); max - min = 0.05.
    # paper: 0.6 - 2 * 0.08 * dev / 0.05 = 0.6 - 3.2 dev: the band is 0.16 wide, the 0.06 block 0.096 below target
    s = owl_sparsities([0.01, 0.02, 0.06, 0.03], target=0.6, lam=0.08)
    assert s == pytest.approx([0.664, 0.632, 0.504, 0.6], abs=1e-12)
    # llmprune: 0.6 - 0.08 * dev / 0.03, the largest deviation 0.03 on the edge of 0.6 +- 0.08
    s = owl_sparsities([0.01, 0.02, 0.06, 0.03], target=0.6, lam=0.08, variant="llmprune")
    assert s == pytest.approx([0.6 + 0.08 * 2 / 3, 0.6 + 0.08 / 3, 0.52, 0.6], abs=1e-12)


def test_owl_paper_mapping_leaves_the_band_and_is_refused_outside_0_1():
    # skewed ratios: one block far above the rest. paper: 0.5 - 0.16 (r - 0.25) / 1 -> 0.54 (x3) and 0.38,
    # 0.12 below the target; llmprune keeps it at 0.42
    assert owl_sparsities([0, 0, 0, 1], 0.5, 0.08) == pytest.approx([0.54, 0.54, 0.54, 0.38], abs=1e-12)
    assert owl_sparsities([0, 0, 0, 1], 0.5, 0.08, variant="llmprune") == pytest.approx(
        [0.5 + 0.08 / 3] * 3 + [0.42], abs=1e-12)
    # 0.1 - 0.18 * 0.75 = -0.035 < 0
    with pytest.raises(UsageError, match=r"sparsity would be -0.0350 .. 0.1450, outside \[0, 1\); use a smaller "
                                         "--owl-lambda than 0.09"):
        owl_sparsities([0, 0, 0, 1], 0.1, 0.09)
    with pytest.raises(UsageError, match="--owl-variant must be one of paper, llmprune, got 'band'"):
        OWL(variant="band")


@pytest.mark.parametrize("seed", range(5))
def test_owl_paper_mean_is_target_and_band_2_lambda(seed):
    g = torch.Generator().manual_seed(seed)
    ratios = torch.rand(12, generator=g).tolist()
    s = torch.tensor(owl_sparsities(ratios, 0.7, 0.08), dtype=torch.float64)
    assert abs(float(s.mean()) - 0.7) < 1e-12
    assert abs(float(s.max() - s.min()) - 0.16) < 1e-12
    order = torch.argsort(torch.tensor(ratios))
    assert (s[order].diff() <= 1e-12).all()


@pytest.mark.parametrize("seed", range(5))
def test_owl_weighted_mean_is_target_and_in_band(seed):
    g = torch.Generator().manual_seed(seed)
    ratios = torch.rand(12, generator=g).tolist()
    weights = torch.randint(1, 10, (12,), generator=g).tolist()
    s = torch.tensor(owl_sparsities(ratios, 0.7, 0.08, weights, "llmprune"), dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    assert abs(float((s * w).sum() / w.sum()) - 0.7) < 1e-12
    assert (s >= 0.7 - 0.08 - 1e-12).all() and (s <= 0.7 + 0.08 + 1e-12).all()
    assert abs(float((s - 0.7).abs().max()) - 0.08) < 1e-12  # the band is used, not shrunk
    # more outliers -> less sparsity
    order = torch.argsort(torch.tensor(ratios))
    assert (s[order].diff() <= 1e-12).all()
    assert owl_sparsities([0.3, 0.3], 0.5, 0.08, variant="llmprune") == [0.5, 0.5]
    assert owl_sparsities([0.3, 0.3], 0.5, 0.08) == [0.5, 0.5]


def test_outlier_ratio_by_hand():
    # mean 10.9, M=5 -> threshold 54.5: only the 100 is an outlier
    assert outlier_ratio(torch.tensor([1.0] * 9 + [100.0]), 5) == pytest.approx(0.1)


def test_block_sizes_by_hand():
    # tiny Llama: hidden 32, 4 heads of 8, 2 key/value heads (16 wide), MLP 64
    # q 32x32 + k 16x32 + v 16x32 + o 32x32 + gate 64x32 + up 64x32 + down 32x64 = 9216 per block
    assert block_sizes(tiny_model("llama", layers=3)) == [9216, 9216, 9216]


@torch.no_grad()
def test_block_outlier_ratios_match_hooks_on_the_models_own_dense_forward():
    """Second path: nothing is pruned, so one whole-model forward with a hook on every Linear sees the inputs
    each block's scores |W| * sqrt(mean x^2) are made of."""
    model = tiny_model("llama", layers=3)
    tokens = random_tokens(4, 32)
    _, blocks = find_decoder(model)
    sums, counts, handles = {}, {}, []
    for b, block in enumerate(blocks):
        for name, layer in prunable_layers(block).items():
            def hook(module, args, key=(b, name)):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[key] = sums.get(key, 0) + (x * x).sum(0)
                counts[key] = counts.get(key, 0) + x.shape[0]

            handles.append(layer.register_forward_pre_hook(hook))
    model(input_ids=tokens, use_cache=False)
    for h in handles:
        h.remove()
    expected = []
    for b, block in enumerate(blocks):
        scores = [(weight_matrix(layer).abs().float() * (sums[b, name] / counts[b, name]).float().sqrt()).flatten()
                  for name, layer in prunable_layers(block).items()]
        expected.append(outlier_ratio(torch.cat(scores), 2.0))
    assert all(r > 0 for r in expected)  # m=2 leaves outliers in every block of the tiny model
    got = block_outlier_ratios(model, tokens, CPU, batch_size=2, m=2.0, progress=False)
    # equal up to one score of a block's 9216 crossing the threshold by rounding (batches of 2 against 4)
    assert got == pytest.approx(expected, abs=1.5 / 9216)


def test_parse_layerwise(tmp_path):
    assert parse_layerwise("uniform") is None and parse_layerwise(None) is None
    assert parse_layerwise("OWL") == OWL(5.0, 0.08, "paper")
    assert parse_layerwise("0.4, 0.6") == [0.4, 0.6]
    f = tmp_path / "l.json"
    f.write_text(json.dumps([0.1, 0.2, 0.3]))
    assert parse_layerwise(str(f)) == [0.1, 0.2, 0.3]
    for bad in ("0.5,abc", "0.5,1.2"):
        with pytest.raises(UsageError, match="--layerwise"):
            parse_layerwise(bad)


@pytest.mark.parametrize("variant", ["paper", "llmprune"])
def test_owl_prune_tiny_model_records_band_and_mean(variant):
    model = tiny_model("llama", layers=4)
    res = llmprune.prune(model, calib_tokens=random_tokens(4, 32), method="wanda", pattern=Unstructured(0.5),
                         layerwise=OWL(variant=variant), device=CPU, progress=False)
    s = res.method_settings["block_sparsity"]
    assert res.method_settings["owl_variant"] == variant
    assert len(s) == 4 and abs(sum(s) / 4 - 0.5) < 1e-12
    if variant == "paper":
        assert max(s) - min(s) == pytest.approx(0.16)
    else:
        assert max(abs(v - 0.5) for v in s) == pytest.approx(0.08)
    _, blocks = find_decoder(model)
    for block, sb in zip(blocks, s):
        for layer in prunable_layers(block).values():
            w = weight_matrix(layer)
            assert int((w == 0).sum()) == w.shape[0] * int(w.shape[1] * sb)


def test_layerwise_list_and_errors():
    model = tiny_model("llama", layers=2)
    llmprune.prune(model, method="magnitude", pattern=Unstructured(0.5, "row"), layerwise=[0.25, 0.75], device=CPU,
                   progress=False)
    _, blocks = find_decoder(model)
    q0, q1 = weight_matrix(blocks[0].self_attn.q_proj), weight_matrix(blocks[1].self_attn.q_proj)
    assert int((q0 == 0).sum()) == q0.numel() // 4 and int((q1 == 0).sum()) == 3 * q1.numel() // 4
    with pytest.raises(UsageError, match="2 blocks"):
        llmprune.prune(model, method="magnitude", layerwise=[0.5], device=CPU, progress=False)
    with pytest.raises(UsageError, match="unstructured sparsity only"):
        llmprune.prune(model, method="wanda", pattern=NM(2, 4), layerwise="owl", device=CPU, progress=False)
    with pytest.raises(UsageError, match="owl-lambda"):
        llmprune.prune(model, method="wanda", sparsity=0.95, layerwise="owl", device=CPU, progress=False)
