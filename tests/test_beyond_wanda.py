"""OWL, RIA, N:M channel permutation, the Wanda variant and the least-squares update, on hand-built tensors."""

import itertools
import json

import pytest
import torch
from typer.testing import CliRunner

import llmprune
from llmprune import NM, Unstructured, UsageError
from llmprune.cli import app
from llmprune.layerwise import OWL, owl_sparsities, outlier_ratio, parse_layerwise
from llmprune.methods import RIA, Wanda, get_method
from llmprune.methods.update import exact_lsq, lsq_update, row_errors
from llmprune.methods.wanda import cumulative_mask
from llmprune.models import find_decoder, prunable_layers, weight_matrix
from llmprune.patterns import select
from llmprune.permute import nm_permutation, permuted_nm_select, retained
from llmprune.stats import Hessian, InputNorms

from .conftest import random_tokens, tiny_model

CPU = torch.device("cpu")


# ---------------------------------------------------------------- OWL
def test_owl_hand_example():
    # mean ratio 0.03, deviations (-0.02, -0.01, 0.03, 0), the largest 0.03 sits on the band's edge
    s = owl_sparsities([0.01, 0.02, 0.06, 0.03], target=0.6, lam=0.08)
    assert s == pytest.approx([0.6 + 0.08 * 2 / 3, 0.6 + 0.08 / 3, 0.52, 0.6], abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_owl_weighted_mean_is_target_and_in_band(seed):
    g = torch.Generator().manual_seed(seed)
    ratios = torch.rand(12, generator=g).tolist()
    weights = torch.randint(1, 10, (12,), generator=g).tolist()
    s = torch.tensor(owl_sparsities(ratios, 0.7, 0.08, weights), dtype=torch.float64)
    w = torch.tensor(weights, dtype=torch.float64)
    assert abs(float((s * w).sum() / w.sum()) - 0.7) < 1e-12
    assert (s >= 0.7 - 0.08 - 1e-12).all() and (s <= 0.7 + 0.08 + 1e-12).all()
    assert abs(float((s - 0.7).abs().max()) - 0.08) < 1e-12  # the band is used, not shrunk
    # more outliers -> less sparsity
    order = torch.argsort(torch.tensor(ratios))
    assert (s[order].diff() <= 1e-12).all()
    assert owl_sparsities([0.3, 0.3], 0.5, 0.08) == [0.5, 0.5]


def test_outlier_ratio_by_hand():
    # mean 10.9, M=5 -> threshold 54.5: only the 100 is an outlier
    assert outlier_ratio(torch.tensor([1.0] * 9 + [100.0]), 5) == pytest.approx(0.1)


def test_parse_layerwise(tmp_path):
    assert parse_layerwise("uniform") is None and parse_layerwise(None) is None
    assert parse_layerwise("OWL") == OWL(5.0, 0.08)
    assert parse_layerwise("0.4, 0.6") == [0.4, 0.6]
    f = tmp_path / "l.json"
    f.write_text(json.dumps([0.1, 0.2, 0.3]))
    assert parse_layerwise(str(f)) == [0.1, 0.2, 0.3]
    for bad in ("0.5,abc", "0.5,1.2"):
        with pytest.raises(UsageError, match="--layerwise"):
            parse_layerwise(bad)


def test_owl_prune_tiny_model_records_band_and_mean():
    model = tiny_model("llama", layers=4)
    res = llmprune.prune(model, calib_tokens=random_tokens(4, 32), method="wanda", pattern=Unstructured(0.5),
                         layerwise="owl", device=CPU, progress=False)
    s = res.method_settings["block_sparsity"]
    assert len(s) == 4 and abs(sum(s) / 4 - 0.5) < 1e-12 and max(abs(v - 0.5) for v in s) == pytest.approx(0.08)
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


# ---------------------------------------------------------------- RIA
def test_ria_score_2x2_by_hand():
    w = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    norms = InputNorms(2, CPU)
    norms.add(torch.tensor([[2.0, 4.0]]))  # ||X_0|| = 2, ||X_1|| = 4 -> ^0.5: sqrt(2), 2
    score = RIA().score(w, {"norms": norms})
    # row sums 3, 7; column sums 4, 6
    expected = torch.tensor([[(1 / 3 + 1 / 4) * 2**0.5, (2 / 3 + 2 / 6) * 2],
                             [(3 / 7 + 3 / 4) * 2**0.5, (4 / 7 + 4 / 6) * 2]])
    assert torch.allclose(score, expected, rtol=1e-6)
    _, keep = RIA().prune(w, {"norms": norms}, Unstructured(0.5))
    assert keep.tolist() == [[False, True], [False, True]]  # 2 > 1.10 and 2.48 > 1.67


# ---------------------------------------------------------------- permutation
def best_nm_retained(scores, pattern):
    cols = scores.shape[1]
    best = 0.0
    for first in itertools.combinations(range(1, cols), pattern.m - 1):  # 8 columns, 2 groups
        g1 = [0, *first]
        perm = torch.tensor(g1 + [c for c in range(cols) if c not in g1])
        best = max(best, retained(scores, pattern, perm))
    return best


@pytest.mark.parametrize("seed", range(4))
def test_permutation_valid_never_worse_and_nm_in_permuted_order(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(6, 8, generator=g) * torch.rand(8, generator=g) ** 2
    pattern = NM(2, 4)
    perm = nm_permutation(scores, pattern)
    assert sorted(perm.tolist()) == list(range(8))
    got = retained(scores, pattern, perm)
    assert retained(scores, pattern) <= got <= best_nm_retained(scores, pattern) + 1e-5
    keep = permuted_nm_select(scores, pattern)
    assert (keep[:, perm].reshape(6, 2, 4).sum(-1) == 2).all()
    assert float((scores * keep).sum()) == pytest.approx(got)


def test_permutation_finds_the_better_grouping():
    # the two large columns sit in the same group: 1:2 can keep only one of them unless they are separated
    scores = torch.tensor([[9.0, 8.0, 1.0, 1.0]])
    perm = nm_permutation(scores, NM(1, 2))
    assert retained(scores, NM(1, 2)) == 10.0 and retained(scores, NM(1, 2), perm) == 17.0


@torch.no_grad()
def test_permutation_leaves_the_model_function_unchanged():
    """Physically permuting the MLP's hidden channels (gate/up rows, down columns) changes nothing; and the
    mask chosen on permuted channels and mapped back computes what the physically permuted N:M model does."""
    model = tiny_model("llama", layers=1)
    mlp = find_decoder(model)[1][0].mlp
    x = torch.randn(3, 5, 32)
    ref = mlp(x)
    scores = torch.rand(32, 64)
    perm = nm_permutation(scores, NM(2, 4))
    assert not torch.equal(perm, torch.arange(64))
    permuted = type(mlp)(model.config)
    permuted.gate_proj.weight.copy_(mlp.gate_proj.weight[perm])
    permuted.up_proj.weight.copy_(mlp.up_proj.weight[perm])
    permuted.down_proj.weight.copy_(mlp.down_proj.weight[:, perm])
    assert torch.allclose(permuted(x), ref, atol=1e-6)
    keep = permuted_nm_select(scores, NM(2, 4))
    mlp.down_proj.weight.mul_(keep)
    hw_mask = select(scores[:, perm], NM(2, 4))  # N:M in the permuted (stored) order
    permuted.down_proj.weight.mul_(hw_mask)
    assert torch.allclose(permuted(x), mlp(x), atol=1e-6)


def test_ria_permute_prunes_every_layer_to_exact_nm_count():
    model = tiny_model("llama", layers=2)
    llmprune.prune(model, calib_tokens=random_tokens(4, 32), method="ria", pattern=NM(2, 4), permute=True,
                   device=CPU, progress=False)
    for block in find_decoder(model)[1]:
        for layer in prunable_layers(block).values():
            w = weight_matrix(layer)
            assert ((w != 0).sum(1) <= w.shape[1] // 2).all()
    with pytest.raises(UsageError, match="--permute"):
        get_method("sparsegpt", permute=True)
    with pytest.raises(UsageError, match="--permute only"):
        llmprune.prune(model, method="magnitude", pattern=Unstructured(0.5), permute=True, device=CPU, progress=False)


# ---------------------------------------------------------------- Wanda variant
def test_wanda_variant_hits_target_with_cumulative_rows():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(64, 128, generator=g) * torch.rand(64, 1, generator=g)
    keep = cumulative_mask(scores, 0.5, tol=1e-3)
    assert abs(float((~keep).double().mean()) - 0.5) <= 1e-3
    per_row = (~keep).sum(1)
    assert per_row.min() < per_row.max()  # rows differ
    for r in range(64):  # in each row, the pruned are the lowest scores
        if 0 < per_row[r] < 128:
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()
    assert Wanda(variant=True).mask(scores, NM(2, 4)).equal(select(scores, NM(2, 4)))


# ---------------------------------------------------------------- weight update
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


# ---------------------------------------------------------------- CLI
@pytest.mark.parametrize("args,msg", [
    (["--permute"], "--permute only changes N:M"),
    (["--layerwise", "owl", "--pattern", "2:4"], "--layerwise works with unstructured"),
    (["--update", "obs"], "--update must be"),
    (["--layerwise", "0.5,x"], "--layerwise"),
    (["--pattern", "2:4", "--permute", "--format", "compressed"], "--format dense"),
])
def test_cli_refuses_bad_options(args, msg, tmp_path):
    res = CliRunner().invoke(app, ["prune", "--model", str(tmp_path / "nowhere"), *args], catch_exceptions=False)
    assert res.exit_code == 2 and msg in res.output.replace("\n", " ")


def test_cli_owl_and_ria_permute_update_reports(tiny_folder, tmp_path, ddir):
    common = ["prune", "--model", str(tiny_folder), "--nsamples", "4", "--seqlen", "32", "--eval", "",
              "--data-dir", str(ddir), "--no-progress", "--device", "cpu", "--dtype", "float32"]
    rep = tmp_path / "owl.json"
    res = CliRunner().invoke(app, [*common, "--sparsity", "0.6", "--layerwise", "owl", "--owl-lambda", "0.1",
                                   "--report", str(rep)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    s = r["method_settings"]["block_sparsity"]
    assert r["method_settings"]["owl_lambda"] == 0.1 and len(s) == 3
    assert abs(sum(s) / 3 - 0.6) < 1e-12 and max(abs(v - 0.6) for v in s) == pytest.approx(0.1)
    rep = tmp_path / "ria.json"
    res = CliRunner().invoke(app, [*common, "--method", "ria", "--pattern", "2:4", "--permute", "--update", "lsq",
                                   "--report", str(rep)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert r["method"] == "ria+lsq" and r["method_settings"]["permute"] is True
    assert r["method_settings"]["update"] == "lsq" and r["sparsity_overall"] == 0.5
