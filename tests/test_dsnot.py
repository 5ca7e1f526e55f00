"""DSnoT mask refinement: hand-computed swaps by the paper's and the llmprune rules, the per-window scale, exact
counts, |eps| never grows (llmprune), a per-row reference loop, the API, the CLI."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

import llmprune
from llmprune import NM, DSnoT, Unstructured, UsageError
from llmprune.cli import app
from llmprune.methods import Wanda, WithDSnoT, get_method
from llmprune.methods.dsnot import refine_mask
from llmprune.patterns import select
from llmprune.stats import InputMeans, InputNorms, feature_variance

from .conftest import random_tokens, tiny_model

CPU = torch.device("cpu")


def expected_error(w, keep, mean):
    """eps per row: sum over pruned weights of W_ij E[x_j], in float64."""
    return ((w.float() * mean.float()) * ~keep).sum(dim=1, dtype=torch.float64)


# ---------------------------------------------------------------- hand-computed cases
def test_unstructured_hand_example():
    # keep {0,1,2}; pruned shares 1, -0.5, 0.8 (S = 1): eps = 1.3.
    # cycle 1, eps > 0: grow the pruned weight with the largest share / Var: column 5 (0.8 / 0.5 = 1.6 beats
    #   column 3's 1 / 1, which plain shares would pick); prune the kept weight with a negative share of least
    #   |W| ||x||: column 1 (-1.2), the only one. eps -> 1.3 - 1.2 - 0.8 = -0.7, smaller: done.
    # cycle 2, eps < 0: grow column 4 (-0.5); prune the least important positive kept weight, column 2 (2):
    #   eps would be -0.7 + 2 + 0.5 = 1.8, larger: llmprune stops the row; paper makes the swap (|eps| 0.7 is above
    #   the threshold, which is all it asks), then has no negative kept weight left for cycle 3.
    w = torch.tensor([[4.0, -1.2, 2.0, 1.0, -0.5, 0.8]])
    keep = torch.tensor([[True, True, True, False, False, False]])
    ones = torch.ones(6)
    var = torch.tensor([1.0, 1, 1, 1, 1, 0.5])
    ours = refine_mask(w, keep, ones, var, ones, Unstructured(0.5), variant="llmprune")
    assert ours.tolist() == [[True, False, True, False, False, True]]
    assert expected_error(w, ours, ones).item() == pytest.approx(-0.7)
    paper = refine_mask(w, keep, ones, var, ones, Unstructured(0.5))
    assert paper.tolist() == [[True, False, False, False, True, True]]
    assert expected_error(w, paper, ones).item() == pytest.approx(1.8)
    # |eps| = 1.3 under the threshold: nothing moves, in either variant
    for variant in ("paper", "llmprune"):
        assert torch.equal(refine_mask(w, keep, ones, var, ones, Unstructured(0.5), threshold=1.35, variant=variant),
                           keep)


NM_W = torch.tensor([[2.0, 0.3, -0.5, 0.1, 0.9, 0.7, 1.6, 0.0]])
NM_MEAN = torch.tensor([1.0, 1, 1, 1, 1, 1, -0.125, 1])  # shares 2, 0.3, -0.5, 0.1 | 0.9, 0.7, -0.2, 0


def test_nm_hand_example_llmprune():
    # 2:4, two groups, ||x|| = 1. Kept {0,2 | 4,6}; pruned shares 0.3, 0.1 | 0.7, 0: eps = 1.1.
    # cycle 1: grow column 5 (0.7). In its group, column 4 is the less important kept weight (0.9 < 1.6) but its
    #   share 0.9 has eps's sign; column 6 (share -0.2) is the one whose removal lowers eps: eps -> 1.1 - 0.2 - 0.7
    #   = 0.2.
    # cycle 2: grow column 1 (0.3), prune column 2 (share -0.5) of group 0: eps would be -0.6, larger: stop.
    keep = select(NM_W.abs(), NM(2, 4))
    assert keep.tolist() == [[True, False, True, False, True, False, True, False]]
    out = refine_mask(NM_W, keep, NM_MEAN, torch.ones(8), torch.ones(8), NM(2, 4), variant="llmprune")
    assert out.tolist() == [[True, False, True, False, True, True, False, False]]
    assert expected_error(NM_W, out, NM_MEAN).item() == pytest.approx(0.2)
    # eps = 1.1 under the threshold: nothing moves
    assert torch.equal(refine_mask(NM_W, keep, NM_MEAN, torch.ones(8), torch.ones(8), NM(2, 4), threshold=1.2,
                                   variant="llmprune"), keep)


def test_nm_hand_example_paper():
    # The same layer by the paper's rules: in the grown weight's group, prune the kept weight of least base score
    # (here |W|, magnitude's), whatever its sign; a swap needs only eps to keep its first sign (+).
    # cycle 1: grow 5 (0.7), prune 4 (0.9 < 1.6): eps 1.1 + 0.9 - 0.7 = 1.3 (larger, still +: made)
    # cycle 2: grow 1 (0.3), prune 2 (0.5 < 2): eps 1.3 - 0.5 - 0.3 = 0.5
    # cycle 3: grow 3 (0.1), prune 0, the group's last weight kept by the method: eps 0.5 + 2 - 0.1 = 2.4
    # cycle 4: no pruned weight of positive share is left to grow: stop.
    keep = select(NM_W.abs(), NM(2, 4))
    out = refine_mask(NM_W, keep, NM_MEAN, torch.ones(8), torch.ones(8), NM(2, 4), base_score=NM_W.abs())
    assert out.tolist() == [[False, True, False, True, False, True, True, False]]
    assert expected_error(NM_W, out, NM_MEAN).item() == pytest.approx(2.4)
    # a base score that ranks column 6 lowest in group 1: cycle 1 prunes it (eps 1.1 - 0.2 - 0.7 = 0.2); cycle 2
    # (grow 1, prune 2) would take eps to -0.6, across zero: refused, the row stops. Same mask as llmprune's here.
    score = NM_W.abs().clone()
    score[0, 6] = 0.1
    out = refine_mask(NM_W, keep, NM_MEAN, torch.ones(8), torch.ones(8), NM(2, 4), base_score=score)
    assert out.tolist() == [[True, False, True, False, True, True, False, False]]


def test_paper_error_is_summed_over_each_window():
    # 2 windows of 4 tokens; features 2 and 3 alternate 0, 0.1 and 0 0.08 (means 0.05, 0.04; variances 0.0025,
    # 0.0016), so Wanda prunes them (|W| ||x|| about 0.035 and 0.028 against 3 and 2). Per token eps = 0.5 * 0.05
    # + 0.5 * 0.04 = 0.045, under 0.1: llmprune leaves the row. Per window (4 tokens) eps = 0.18, over 0.1: paper
    # grows column 3 (share / Var 0.08 / 0.0016 = 50 beats 0.1 / 0.0025 = 40) and prunes column 1, the kept
    # weight of opposite share (-2 per token).
    x = torch.tensor([[1.0, -1.0, 0.0, 0.0], [1.0, -1.0, 0.1, 0.08]]).repeat(4, 1).reshape(2, 4, 4)
    norms, means = InputNorms(4, CPU), InputMeans(4, CPU)
    norms.add(x)
    means.add(x)
    assert (means.tokens, means.windows) == (8, 2)
    assert means.per_window.tolist() == pytest.approx([4.0, -4.0, 0.2, 0.16])
    w = torch.tensor([[3.0, 2.0, 0.5, 0.5]])
    stats = {"norms": norms, "means": means}
    _, keep = WithDSnoT(Wanda(), variant="llmprune").prune(w, stats, Unstructured(0.5))
    assert keep.tolist() == [[True, True, False, False]]
    _, keep = WithDSnoT(Wanda()).prune(w, stats, Unstructured(0.5))
    assert keep.tolist() == [[True, False, False, True]]
    # the paper's threshold is on that scale: above 0.18 nothing moves
    _, keep = WithDSnoT(Wanda(), threshold=0.19).prune(w, stats, Unstructured(0.5))
    assert keep.tolist() == [[True, True, False, False]]


# ---------------------------------------------------------------- properties on random tensors
def random_case(seed, rows=24, cols=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, cols, generator=g) * torch.rand(cols, generator=g) * 2 + torch.randn(cols, generator=g)
    w = torch.randn(rows, cols, generator=g)
    norms, means = InputNorms(cols, CPU), InputMeans(cols, CPU)
    norms.add(x)
    means.add(x)
    return w, x, norms, means


PATTERNS = [(Unstructured(0.5), "row"), (Unstructured(0.7), "row"), (Unstructured(0.6), "matrix"), (NM(2, 4), "row"),
            (NM(1, 4), "row"), (NM(4, 8), "row")]


def check_counts(w, keep, out, pattern):
    assert torch.equal(out.sum(dim=1), keep.sum(dim=1))  # every row keeps its count
    if isinstance(pattern, NM):
        assert (out.reshape(w.shape[0], -1, pattern.m).sum(-1) == pattern.n).all()  # every group its N
    grown, removed = out & ~keep, keep & ~out
    assert torch.equal(grown.sum(1), removed.sum(1)) and (grown.sum(1) <= 50).all()
    assert grown.any()


@pytest.mark.parametrize("pattern,scope", PATTERNS)
@pytest.mark.parametrize("seed", range(3))
def test_counts_kept_and_error_never_grows(pattern, scope, seed):
    w, x, norms, means = random_case(seed)
    keep = select(w.abs() * norms.mean_sq.sqrt(), pattern, scope)
    out = refine_mask(w, keep, means.mean, feature_variance(norms, means), norms.mean_sq, pattern, threshold=0.0,
                      variant="llmprune")
    check_counts(w, keep, out, pattern)
    before, after = expected_error(w, keep, means.mean).abs(), expected_error(w, out, means.mean).abs()
    assert (after <= before).all()
    # and it does something (less in N:M, where the weight to prune must come from the grown weight's group)
    assert after.sum() < (0.9 if isinstance(pattern, NM) else 0.5) * before.sum()


@pytest.mark.parametrize("pattern,scope", PATTERNS)
@pytest.mark.parametrize("seed", range(3))
def test_paper_counts_kept_and_nm_sign_kept(pattern, scope, seed):
    w, x, norms, means = random_case(seed)
    keep = select(w.abs() * norms.mean_sq.sqrt(), pattern, scope)
    out = refine_mask(w, keep, means.mean, feature_variance(norms, means), norms.mean_sq, pattern, threshold=0.0,
                      base_score=w.abs())
    check_counts(w, keep, out, pattern)
    if isinstance(pattern, NM):  # a swap never takes eps across zero
        before, after = expected_error(w, keep, means.mean), expected_error(w, out, means.mean)
        assert torch.equal(torch.sign(before), torch.sign(after))


def reference_refine(w, keep, mean, var, mean_sq, m=None, cycles=50, threshold=0.1, variant="llmprune", base=None):
    """The same rules row by row with Python lists: the slow second path."""
    share = (w.float() * mean.float()).double()
    importance = w.float().abs() * mean_sq.float().sqrt()
    growth = (w.float() * mean.float()) / var.float().clamp_min(1e-12)
    out = keep.clone()
    for i in range(w.shape[0]):
        kept0 = set(keep[i].nonzero().flatten().tolist())
        pruned0 = set(range(w.shape[1])) - kept0
        eps = float((share[i] * ~keep[i]).sum())
        sign0 = math.copysign(1.0, eps) if eps else 0.0
        grown, removed = set(), set()
        for _ in range(cycles):
            if abs(eps) <= threshold:
                break
            up = eps > 0
            cand = [j for j in pruned0 - grown if (share[i, j] > 0 if up else share[i, j] < 0)]
            if not cand:
                break
            g = (max if up else min)(cand, key=lambda j: float(growth[i, j]))
            if m:
                start = g - g % m
                group = range(start, start + m)
            else:
                group = range(w.shape[1])
            paper_nm = variant == "paper" and m
            options = [j for j in group if j in kept0 - removed
                       and (paper_nm or (share[i, j] < 0 if up else share[i, j] > 0))]
            if not options:
                break
            p = min(options, key=lambda j: float((base if paper_nm else importance)[i, j]))
            after = eps + float(share[i, p]) - float(share[i, g])
            if variant == "llmprune" and abs(after) >= abs(eps):
                break
            if paper_nm and (math.copysign(1.0, after) if after else 0.0) != sign0:
                break
            grown.add(g)
            removed.add(p)
            out[i, g], out[i, p] = True, False
            eps = after
    return out


@pytest.mark.parametrize("variant", ["paper", "llmprune"])
@pytest.mark.parametrize("pattern", [Unstructured(0.7), NM(2, 4)])
@pytest.mark.parametrize("cycles,threshold", [(50, 0.1), (3, 0.0), (50, 2.0)])
def test_vectorised_rows_match_the_row_loop(pattern, cycles, threshold, variant):
    w, x, norms, means = random_case(7, rows=16, cols=48)
    keep = select(w.abs(), pattern)  # magnitude's mask, so its score differs from Wanda's importance
    var = feature_variance(norms, means)
    out = refine_mask(w, keep, means.mean, var, norms.mean_sq, pattern, cycles, threshold, variant, w.abs())
    ref = reference_refine(w, keep, means.mean, var, norms.mean_sq, getattr(pattern, "m", None), cycles, threshold,
                           variant, w.abs())
    assert torch.equal(out, ref)
    assert not torch.equal(out, keep)


def test_the_variants_differ_on_random_rows():
    w, x, norms, means = random_case(3, rows=16, cols=48)
    var = feature_variance(norms, means)
    for pattern in (Unstructured(0.5), NM(2, 4)):
        keep = select(w.abs(), pattern)
        masks = [refine_mask(w, keep, means.mean, var, norms.mean_sq, pattern, threshold=0.0, variant=v,
                             base_score=w.abs()) for v in ("paper", "llmprune")]
        assert not torch.equal(*masks)


# ---------------------------------------------------------------- method object, API, CLI
def test_method_wrapping_and_refusals():
    m = get_method("wanda", refine="dsnot", update="lsq")
    assert m.name == "wanda+dsnot+lsq" and set(m.needs) == {"norms", "means", "hessian"}
    assert isinstance(m.method, WithDSnoT) and m.settings()["dsnot_cycles"] == 50
    assert m.settings()["dsnot_variant"] == "paper"
    settings = get_method("ria", refine=DSnoT(7, 0.5, "llmprune")).settings()
    assert settings.items() >= {"refine": "dsnot", "dsnot_cycles": 7, "dsnot_threshold": 0.5, "a": 0.5,
                                "dsnot_variant": "llmprune"}.items()
    with pytest.raises(UsageError, match="--refine dsnot refines the mask of a score method"):
        get_method("sparsegpt", refine="dsnot")
    with pytest.raises(UsageError, match="--refine must be one of none, dsnot"):
        get_method("wanda", refine="dsnt")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(UsageError, match="--dsnot-cycles must be a positive integer"):
            DSnoT(cycles=bad)
    for bad in (-0.1, math.inf, math.nan):
        with pytest.raises(UsageError, match="--dsnot-threshold must be a finite number >= 0"):
            DSnoT(threshold=bad)
    with pytest.raises(UsageError, match="--dsnot-variant must be one of paper, llmprune, got 'official'"):
        DSnoT(variant="official")


def masks(model):
    return {n: (m.weight == 0) for n, m in model.named_modules() if n.endswith(("_proj", "fc1", "fc2"))}


@pytest.mark.parametrize("pattern", [Unstructured(0.7), NM(2, 4)])
def test_api_refines_the_wanda_mask(pattern):
    tokens = random_tokens(4, 32)
    plain, refined = tiny_model("llama", layers=2), tiny_model("llama", layers=2)
    ref = llmprune.prune(plain, calib_tokens=tokens, method="wanda", pattern=pattern, device=CPU, progress=False)
    # random embeddings give inputs of mean ~0: |eps| stays under the default threshold, so use 0
    res = llmprune.prune(refined, calib_tokens=tokens, method="wanda", pattern=pattern, refine=DSnoT(threshold=0.0),
                         device=CPU, progress=False)
    assert res.method == "wanda+dsnot" and res.method_settings["refine"] == "dsnot"
    assert res.sparsity_overall == ref.sparsity_overall
    a, b = masks(plain), masks(refined)
    changed = 0
    for name in a:
        assert torch.equal(a[name].sum(1), b[name].sum(1)), name  # same count per row
        if isinstance(pattern, NM):
            assert (~b[name]).reshape(b[name].shape[0], -1, 4).sum(-1).eq(2).all()
        changed += int((a[name] != b[name]).sum())
    q = "model.layers.0.self_attn.q_proj"  # block 0 sees the same inputs in both runs
    assert not torch.equal(a[q], b[q]) and changed > 0


def test_api_composes_with_permute_update_and_owl():
    tokens = random_tokens(4, 32)
    model = tiny_model("llama", layers=2)
    res = llmprune.prune(model, calib_tokens=tokens, method="ria", pattern="2:4", permute=True, update="lsq",
                         refine=DSnoT(cycles=10), device=CPU, progress=False)
    assert res.method == "ria+dsnot+lsq" and res.sparsity_overall == 0.5
    assert res.method_settings["permute"] is True and res.method_settings["dsnot_cycles"] == 10
    model = tiny_model("llama", layers=2)
    res = llmprune.prune(model, calib_tokens=tokens, method="magnitude", sparsity=0.6, layerwise="owl",
                         refine="dsnot", device=CPU, progress=False)
    assert res.method == "magnitude+dsnot" and res.sparsity_overall == pytest.approx(0.6, abs=1e-3)
    with pytest.raises(UsageError, match="--permute only changes N:M"):
        llmprune.prune(tiny_model("llama"), calib_tokens=tokens, method="wanda", permute=True, refine="dsnot",
                       update="lsq", device=CPU, progress=False)


@pytest.mark.parametrize("variant", ["paper", "llmprune"])
def test_permuted_refinement_keeps_groups_in_permuted_order(variant):
    from llmprune.permute import nm_permutation

    w, x, norms, means = random_case(5, rows=16, cols=32)
    stats = {"norms": norms, "means": means}
    base = Wanda(permute=True)
    _, keep = WithDSnoT(base, threshold=0.0, variant=variant).prune(w, stats, NM(2, 4))
    perm = nm_permutation(base.score(w, stats), NM(2, 4))
    assert (keep[:, perm].reshape(16, -1, 4).sum(-1) == 2).all()
    _, start = base.prune(w, stats, NM(2, 4))
    assert not torch.equal(keep, start)
    before, after = expected_error(w, start, means.mean), expected_error(w, keep, means.mean)
    if variant == "llmprune":
        assert (after.abs() <= before.abs()).all()
    else:
        assert torch.equal(torch.sign(after), torch.sign(before))


def test_cli_round_trip(tiny_folder, tmp_path, ddir):
    rep = tmp_path / "dsnot.json"
    res = CliRunner().invoke(app, ["prune", "--model", str(tiny_folder), "--nsamples", "4", "--seqlen", "32",
                                   "--eval", "", "--data-dir", str(ddir), "--no-progress", "--device", "cpu",
                                   "--dtype", "float32", "--sparsity", "0.7", "--refine", "dsnot",
                                   "--dsnot-cycles", "5", "--dsnot-threshold", "0.01", "--dsnot-variant", "llmprune",
                                   "--report", str(rep)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    r = json.loads(rep.read_text())
    assert r["method"] == "wanda+dsnot"
    assert r["method_settings"].items() >= {"refine": "dsnot", "dsnot_cycles": 5, "dsnot_threshold": 0.01,
                                            "dsnot_variant": "llmprune"}.items()
    assert all(abs(layer["sparsity"] - 0.7) < 0.02 for layer in r["layers"])
