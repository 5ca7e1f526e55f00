"""Structured pruning: options, width planning by hand, the block-by-block run, the API, the command line."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmprune
from llmprune import UsageError, surgery
from llmprune.cli import app
from llmprune.methods.channels import fluctuation, keep_top, obs_keep, wanda_sp
from llmprune.methods.update import lsq_columns
from llmprune.models import find_decoder
from llmprune.stats import Hessian, InputMeans, InputNorms
from llmprune.structured import (Structured, Widths, _round_counts, adaptive_widths, parse_widths, plan_widths,
                                 portable_kv_heads)

from .conftest import random_tokens, tiny_model

CPU = torch.device("cpu")


def plan(structures, remove, multiple=8, layers=4):
    return plan_widths(surgery.shape_of(tiny_model("llama", layers=layers)), Structured(structures, remove, multiple=multiple))


def test_plan_widths_by_hand():
    # tiny Llama block: 9280 parameters; an MLP channel costs 96, a KV group 1536; 2 groups, 64 channels
    assert plan(("mlp",), 0.25) == Widths(40, 2, 4)  # 2320 / 96 = 24.2 channels -> 39.8 -> 40
    assert plan(("heads",), 0.2) == Widths(64, 1, 4)  # 1856 / 1536 = 1.2 groups -> 1
    assert plan(("mlp", "heads"), 0.4) == Widths(40, 1, 4)  # 0.4 x 2 groups -> 1; (3712 - 1536) / 96 = 22.7
    assert plan(("blocks",), 0.5) == Widths(64, 2, 2)
    # blocks with widths: each takes 1 - sqrt(1 - 0.36) = 0.2; one block of 4 goes, the MLP takes the rest
    assert plan(("mlp", "blocks"), 0.36) == Widths(48, 2, 3)
    assert plan(("mlp",), 0.25, multiple=32) == Widths(32, 2, 4)
    assert plan(("heads",), 0.9) == Widths(64, 1, 4)  # at least one KV group stays


def test_head_counts_stay_divisors_of_the_hidden_size():
    # Llama-2-7B's block: 32 heads of 128 in 4096; any other count must still divide 4096 (powers of two)
    shape = surgery.Shape(hidden=4096, intermediate=11008, heads=32, kv_heads=32, head_dim=128, layers=32,
                          block_params=202383360, channel_params=3 * 4096, group_params=4 * 128 * 4096)
    assert portable_kv_heads(shape) == [1, 2, 4, 8, 16, 32]
    # 20%: 6.4 groups would go (25.6 kept); 32 is nearer than 16, so the MLP takes it all: 3294 channels
    assert plan_widths(shape, Structured(("mlp", "heads"), 0.2, multiple=32)) == Widths(7712, 32, 32)
    assert plan_widths(shape, Structured(("heads",), 0.2)) == Widths(11008, 16, 32)  # 19.3 of 32 go: 12.7 -> 16
    with pytest.raises(UsageError, match="num_key_value_heads=26: 26 query heads do not divide hidden_size 4096"):
        plan_widths(shape, Structured(("heads",), widths={"num_key_value_heads": 26}))
    gqa = surgery.Shape(hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, layers=30,
                        block_params=3540096, channel_params=3 * 576, group_params=5 * 64 * 576)
    assert portable_kv_heads(gqa) == [1, 2, 3]  # SmolLM2: 3, 6 or 9 heads all divide 576
    odd = surgery.Shape(hidden=640, intermediate=2048, heads=3, kv_heads=3, head_dim=256, layers=2,
                        block_params=1, channel_params=1, group_params=1)
    assert portable_kv_heads(odd) == [1, 2, 3]  # the model's own count does not divide: no constraint to keep


def test_explicit_widths_and_their_limits():
    shape = surgery.shape_of(tiny_model("llama"))
    opts = Structured(("mlp", "heads"), widths=parse_widths("intermediate_size=24,num_key_value_heads=1"))
    assert plan_widths(shape, opts) == Widths(24, 1, 2)
    with pytest.raises(UsageError, match="num_key_value_heads=3: the model has 2"):
        plan_widths(shape, Structured(("heads",), widths={"num_key_value_heads": 3}))


@pytest.mark.parametrize("kwargs,msg", [
    (dict(structures=("mlp", "rows"), remove=0.2), "unknown structure 'rows'"),
    (dict(remove=1.0), "in (0, 1); got 1.0"),
    (dict(remove=0.0), "in (0, 1)"),
    (dict(), "needs --remove FRACTION"),
    (dict(remove=0.2, widths={"intermediate_size": 8}), "give one of them"),
    (dict(structures=("mlp", "heads"), widths={"intermediate_size": 8}), "one width per --structure"),
    (dict(remove=0.2, importance="taylor"), "--importance must be one of wanda-sp, flap, magnitude, obs"),
    (dict(remove=0.2, restore="retrain"), "--restore must be one of none, lsq, lsq-dense, bias"),
])
def test_options_refused_with_one_line(kwargs, msg):
    with pytest.raises(UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        Structured(**kwargs)


def test_needs_follow_importance_and_restoration():
    assert Structured(remove=0.2, importance="magnitude").needs == ()
    assert not Structured(remove=0.2, importance="magnitude").needs_calibration
    assert Structured(remove=0.2, importance="flap", restore="lsq").needs == ("norms", "means", "hessian")
    assert Structured(("blocks",), 0.2).needs == () and Structured(("blocks",), 0.2).needs_calibration
    assert Structured(remove=0.2, importance="obs", restore="lsq").needs == ("hessian",)
    assert Structured(remove=0.2, importance="obs").settings()["obs_max_steps"] == 1024


def run(model, tokens=None, **kw):
    return llmprune.prune_structured(model, calib_tokens=tokens, device="cpu", batch_size=4, progress=False, **kw)


def test_exact_widths_and_parameter_counts():
    model = tiny_model("llama", layers=2)
    res = run(model, random_tokens(4, 16), structure="mlp,heads", widths="intermediate_size=40,num_key_value_heads=1")
    for block in find_decoder(model)[1]:
        assert block.mlp.gate_proj.weight.shape == (40, 32) and block.mlp.down_proj.weight.shape == (32, 40)
        assert block.self_attn.q_proj.weight.shape == (16, 32) and block.self_attn.k_proj.weight.shape == (8, 32)
        assert block.self_attn.o_proj.weight.shape == (32, 16)
    per_block = 40 * 32 * 3 + 16 * 32 + 8 * 32 * 2 + 32 * 16 + 2 * 32
    assert res.params["decoder_before"] == 2 * 9280 and res.params["decoder_after"] == 2 * per_block
    assert res.removed_fraction == pytest.approx(1 - per_block / 9280)
    assert res.params["model_before"] - res.params["model_after"] == 2 * (9280 - per_block)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim) == (40, 1, 2, 8)


def test_the_group_and_channels_without_importance_are_removed():
    model = tiny_model("llama", layers=1)
    block = find_decoder(model)[1][0]
    with torch.no_grad():
        block.self_attn.o_proj.weight[:, :16] = 0.0  # KV group 0 (query heads 0, 1) feeds nothing
        block.mlp.down_proj.weight[:, 50:] = 0.0
    res = run(model, random_tokens(4, 16), structure="mlp,heads", widths="intermediate_size=50,num_key_value_heads=1")
    assert res.blocks[0]["kv_groups_kept"] == [1]
    assert torch.count_nonzero(block.mlp.down_proj.weight.abs().sum(0)) == 50  # only live channels kept


def down_proj_inputs(model, tokens):
    return down_proj_inputs_of(model, tokens, 0)


def down_proj_inputs_of(model, tokens, index):
    seen = []
    hook = find_decoder(model)[1][index].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(tokens, use_cache=False)
    hook.remove()
    return torch.cat(seen).reshape(-1, seen[0].shape[-1])


def test_lsq_restoration_equals_a_dampened_lstsq():
    model = tiny_model("llama", layers=1)
    tokens = random_tokens(4, 24)
    x = down_proj_inputs(model, tokens).double()
    w0 = find_decoder(model)[1][0].mlp.down_proj.weight.detach().clone().double()
    norms = InputNorms(64, CPU)
    norms.add(x)
    kept = keep_top(wanda_sp(w0.float(), {"norms": norms}), 40)
    run(model, tokens, structure="mlp", widths="intermediate_size=40", restore="lsq")
    # the objective 2/n ||X_S w - X w0||^2 + d ||w - w0_S||^2, d = 1% of the mean diagonal of 2 X^T X / n
    n = x.shape[0]
    d = 0.01 * (2 / n) * (x * x).sum(0).mean()
    a = torch.cat([(2 / n) ** 0.5 * x[:, kept], d.sqrt() * torch.eye(40, dtype=torch.float64)])
    b = torch.cat([(2 / n) ** 0.5 * x @ w0.T, d.sqrt() * w0[:, kept].T])
    ref = torch.linalg.lstsq(a, b).solution.T
    got = find_decoder(model)[1][0].mlp.down_proj.weight.double()
    assert torch.allclose(got, ref, atol=2e-5)


def test_obs_selects_and_lsq_refits_block_zero_from_its_inputs():
    model = tiny_model("llama", layers=1)
    tokens = random_tokens(4, 24)
    x = down_proj_inputs(model, tokens)
    w0 = find_decoder(model)[1][0].mlp.down_proj.weight.detach().clone()
    h = Hessian(64, CPU)
    h.add(x)
    kept = obs_keep(w0, {"hessian": h}, 64, 40, 0.01)
    res = run(model, tokens, structure="mlp", widths="intermediate_size=40", importance="obs", restore="lsq")
    got = find_decoder(model)[1][0].mlp.down_proj.weight
    assert torch.allclose(got, lsq_columns(w0, kept, h.matrix, 0.01), atol=1e-5)
    assert res.options.settings()["importance"] == "obs"
    # and the greedy's pick re-fits better than the wanda-sp pick on the same inputs
    norms = InputNorms(64, CPU)
    norms.add(x)
    other = keep_top(wanda_sp(w0, {"norms": norms}), 40)
    err = lambda k: ((x[:, k] @ lsq_columns(w0, k, h.matrix, 0.01).T - x @ w0.T) ** 2).sum()
    assert err(kept) < err(other)


def test_lsq_dense_fits_each_block_onto_the_unshrunk_models_outputs():
    original = tiny_model("llama", layers=2)
    model = copy.deepcopy(original)
    tokens = random_tokens(4, 24)
    run(model, tokens, structure="mlp", widths="intermediate_size=40", restore="lsq-dense")
    blocks, before = find_decoder(model)[1], find_decoder(original)[1]
    # block 0 sees the same inputs in both streams: the plain lsq fit
    plain = copy.deepcopy(original)
    run(plain, tokens, structure="mlp", widths="intermediate_size=40", restore="lsq")
    assert torch.allclose(blocks[0].mlp.down_proj.weight, find_decoder(plain)[1][0].mlp.down_proj.weight, atol=1e-6)
    # block 1: the pruned model's inputs (block 0 shrunk, block 1 whole) fitted to the unshrunk model's outputs
    y = down_proj_inputs_of(original, tokens, 1)
    half = copy.deepcopy(original)
    find_decoder(half)[1][0] = copy.deepcopy(blocks[0])
    x = down_proj_inputs_of(half, tokens, 1)
    w1 = before[1].mlp.down_proj.weight.detach()
    norms, h = InputNorms(64, CPU), Hessian(64, CPU)
    norms.add(x)
    h.add(x)
    kept = keep_top(wanda_sp(w1, {"norms": norms}), 40)
    expected = lsq_columns(w1, kept, h.matrix, 0.01, (2 / x.shape[0]) * x.double().T @ y.double())
    assert torch.allclose(blocks[1].mlp.down_proj.weight, expected, atol=1e-5)
    assert not torch.allclose(expected, lsq_columns(w1, kept, h.matrix, 0.01), atol=1e-4)


def test_post_norm_objective_weights_each_token_by_its_outputs_rms():
    original = tiny_model("gemma3", layers=1)
    block0 = find_decoder(original)[1][0]
    with torch.no_grad():  # Gemma 3's norm multiplies by 1 + weight: a gain that differs from feature to feature
        block0.post_feedforward_layernorm.weight.copy_(torch.linspace(-0.9, 3.0, 32))
    tokens = random_tokens(4, 24)
    model = copy.deepcopy(original)
    run(model, tokens, structure="mlp", widths="intermediate_size=40", importance="flap", restore="lsq",
        objective="post-norm")
    x = down_proj_inputs(original, tokens).double()
    w0 = block0.mlp.down_proj.weight.detach().double()
    # by hand: token t weighs 1 / (mean_d y_td^2 + eps), y_t = down_proj(x_t), what the norm divides by
    w = 1 / ((x @ w0.T).pow(2).mean(dim=1, keepdim=True) + block0.post_feedforward_layernorm.eps)
    mean = (w * x).sum(0) / w.sum()
    var = (w * x * x).sum(0) / w.sum() - mean ** 2
    gain = 1 + torch.linspace(-0.9, 3.0, 32, dtype=torch.float64)
    kept = keep_top(var * (gain[:, None] * w0).pow(2).sum(0), 40)
    h = 2 * (w * x).T @ x / w.sum()
    got = find_decoder(model)[1][0].mlp.down_proj.weight
    assert torch.allclose(got, lsq_columns(w0.float(), kept, h.float(), 0.01), atol=1e-5)
    unweighted = keep_top(x.var(0, correction=0) * w0.pow(2).sum(0), 40)
    assert not torch.equal(kept, unweighted)  # the case tells the weighted selection from the plain one


@pytest.mark.parametrize("arch,kwargs,msg", [
    ("llama", dict(restore="lsq"), "--objective post-norm: LlamaDecoderLayer adds o_proj's and down_proj's outputs"),
    ("gemma3", dict(restore="lsq-dense"), "not --restore lsq-dense"),
    ("gemma3", dict(importance="flap", restore="bias"), "not --restore bias"),
    ("gemma3", dict(importance="magnitude", restore="none"), "--importance magnitude with --restore none reads none"),
    ("gemma3", dict(restore="lsq", objective="after"), "--objective must be one of output, post-norm"),
])
def test_post_norm_objective_refused_where_it_means_nothing(arch, kwargs, msg):
    kwargs = {"objective": "post-norm", **kwargs}
    with pytest.raises(UsageError, match=msg):
        run(tiny_model(arch, layers=1), random_tokens(4, 16), structure="mlp", remove=0.3, **kwargs)


def test_adaptive_widths_by_hand():
    a = torch.tensor([0.0, 0, 0, 0, 0, 0, 10, 10])  # z: zeros -0.540, tens 1.620
    b = torch.arange(8.0)  # z = (i - 3.5) / 2.449
    # top 8 of the z-scores: a's tens, b's 7..3, then the first of a's zeros (-0.540 above b's 2 at -0.612)
    assert adaptive_widths([a, b], 8, 1) == [3, 5]
    assert adaptive_widths([a, b], 8, 2) == [4, 4]  # 3 and 5 floored to 2 and 4; the block furthest below grows
    assert adaptive_widths([b, b * 100 + 7], 8, 1) == [4, 4]  # standardised: the scale of a block's scores is moot


def test_round_counts_keep_bounds_and_total():
    assert _round_counts([70, 10, 40], [128, 128, 128], 96, 32) == [32, 32, 32]  # at least one multiple each
    assert _round_counts([128, 100, 20], [128, 128, 128], 256, 32) == [128, 96, 32]
    assert _round_counts([60, 60], [60, 60], 120, 32) == [60, 60]  # a full block stays full, off the multiple


def test_adaptive_allocation_gives_a_dead_block_fewer_channels_and_loads_with_llmprune(tmp_path):
    model = tiny_model("gemma3", layers=4)
    with torch.no_grad():  # 48 of block 0's 64 channels feed nothing: their scores are 0
        find_decoder(model)[1][0].mlp.down_proj.weight[:, 16:] = 0.0
    tokens = random_tokens(4, 24)
    res = run(model, tokens, structure="mlp", remove=0.3, importance="flap", restore="lsq", allocation="adaptive",
              width_multiple=8)
    sizes = [b["intermediate_size"] for b in res.blocks]
    assert sizes == [16, 32, 32, 48] and sum(sizes) == 4 * res.widths.intermediate_size
    assert [b.mlp.down_proj.in_features for b in find_decoder(model)[1]] == sizes
    assert res.params["decoder_after"] == surgery.decoder_params(model)
    assert model.config.llmprune_intermediate_sizes == sizes and model.config.intermediate_size == 48
    assert res.options.settings()["allocation"] == "adaptive"
    model.save_pretrained(tmp_path)
    loaded = llmprune.load(tmp_path, verify=False)
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, model(tokens).logits, atol=1e-5)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # plain transformers refuses it, loudly
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(structure="heads", remove=0.3), "add mlp to --structure"),
    (dict(importance="obs"), "--importance obs gives none"),
    (dict(allocation="global"), "--allocation must be one of uniform, adaptive"),
])
def test_adaptive_allocation_refused_where_it_cannot_apply(kwargs, msg):
    kwargs = {"structure": "mlp", "remove": 0.3, "allocation": "adaptive", **kwargs}
    with pytest.raises(UsageError, match=msg):
        run(tiny_model("llama", layers=1), random_tokens(4, 16), **kwargs)


def test_blocks_remove_the_block_that_changes_nothing():
    model = tiny_model("llama", layers=3)
    with torch.no_grad():  # block 1 adds zero to the residual stream: cos(input, output) = 1
        find_decoder(model)[1][1].self_attn.o_proj.weight.zero_()
        find_decoder(model)[1][1].mlp.down_proj.weight.zero_()
    res = run(model, random_tokens(4, 16), structure="blocks", widths="num_hidden_layers=2")
    assert res.kept_blocks == [0, 2] and res.block_importance[1] == pytest.approx(0.0, abs=1e-6)
    assert model.config.num_hidden_layers == 2 and [b["source_block"] for b in res.blocks] == [0, 2]


@pytest.mark.parametrize("arch,restore", [("llama", "bias"), ("llama", "lsq"), ("gemma3", "lsq"), ("qwen2", "none"),
                                          ("mistral", "lsq"), ("qwen3", "bias")])
def test_saved_folder_loads_plainly_and_matches(arch, restore, tmp_path):
    model = tiny_model(arch, layers=3)
    structure = "heads,blocks" if restore == "bias" and arch != "llama" else "mlp,heads,blocks"
    run(model, random_tokens(4, 16), structure=structure, remove=0.5, restore=restore, importance="flap",
        width_multiple=8)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = random_tokens(2, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert sum(p.numel() for p in again.parameters()) == surgery.model_params(model)


def test_bias_refused_where_the_config_has_no_flag():
    with pytest.raises(UsageError, match="--restore bias adds a bias to down_proj, but Gemma3ForCausalLM"):
        run(tiny_model("gemma3"), random_tokens(4, 16), structure="mlp", remove=0.3, restore="bias")
    with pytest.raises(UsageError, match="--structure: structured pruning supports"):
        run(tiny_model("gpt2"), random_tokens(4, 16), structure="mlp", remove=0.3)


def test_magnitude_needs_no_calibration():
    model = tiny_model("llama", layers=2)
    res = run(model, None, structure="mlp", remove=0.25, importance="magnitude", width_multiple=8)
    assert res.calibration is None and res.widths.intermediate_size == 40


# ---------------------------------------------------------------- the command line


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_cli_structured_end_to_end(tiny_folder, tmp_path, ddir):
    out, rep = tmp_path / "small", tmp_path / "run.json"
    res = invoke("prune", "--model", tiny_folder, "--structure", "mlp,heads", "--remove", 0.3, "--width-multiple", 8,
                 "--importance", "flap", "--restore", "lsq", "--nsamples", 4, "--seqlen", 32, "--eval", "wikitext2",
                 "--max-eval-windows", 2, "--out", out, "--report", rep, "--data-dir", ddir, "--no-progress",
                 "--device", "cpu", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report == json.loads((out / "llmprune_report.json").read_text())
    st = report["structured"]
    assert st["widths"] == {"intermediate_size": 48, "num_key_value_heads": 1, "num_hidden_layers": 3,  # 2784 per block: 1 group + 13 channels
                            "num_attention_heads": 2}
    assert st["settings"]["importance"] == "flap" and st["settings"]["restore"] == "lsq"
    assert len(st["blocks"]) == 3 and st["params"]["decoder_after"] < st["params"]["decoder_before"]
    assert st["removed_fraction"] == pytest.approx(1 - st["params"]["decoder_after"] / st["params"]["decoder_before"])
    assert report["perplexity"]["wikitext2"]["pruned"] > 1 and report["calibration"]["nsamples"] == 4
    assert "decoder parameters" in res.output and "removed" in res.output
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.intermediate_size == 48 and model.config.num_key_value_heads == 1
    assert report["weights_sha256"] == llmprune.integrity.state_sha256(model)
    res = invoke("eval", "--model", out, "--eval", "wikitext2", "--max-eval-windows", 2, "--data-dir", ddir,
                 "--no-progress", "--device", "cpu", "--dtype", "float32", "--report", tmp_path / "eval.json")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "eval.json").read_text())["perplexity"]["wikitext2"]["perplexity"]
    assert again == pytest.approx(report["perplexity"]["wikitext2"]["pruned"], rel=1e-5)


def test_cli_adaptive_widths_save_and_evaluate_again(tokenizer, tmp_path, ddir):
    folder, out, rep = tmp_path / "tiny", tmp_path / "small", tmp_path / "run.json"
    model = tiny_model("llama", layers=3)
    with torch.no_grad():  # block 0's channels 16.. feed nothing: it gets fewer than the others
        find_decoder(model)[1][0].mlp.down_proj.weight[:, 16:] = 0.0
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    res = invoke("prune", "--model", folder, "--structure", "mlp", "--remove", 0.3, "--width-multiple", 8,
                 "--importance", "wanda-sp", "--allocation", "adaptive", "--restore", "lsq", "--nsamples", 4,
                 "--seqlen", 32, "--eval", "wikitext2", "--max-eval-windows", 2, "--out", out, "--report", rep,
                 "--data-dir", ddir, "--no-progress", "--device", "cpu", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    sizes = [b["intermediate_size"] for b in report["structured"]["blocks"]]
    assert sizes[0] < sizes[1] and sum(sizes) == 3 * report["structured"]["widths"]["intermediate_size"]
    assert json.loads((out / "config.json").read_text())["llmprune_intermediate_sizes"] == sizes
    assert report["structured"]["settings"]["allocation"] == "adaptive"
    model = llmprune.load(out)
    assert [b.mlp.down_proj.in_features for b in find_decoder(model)[1]] == sizes
    assert report["weights_sha256"] == llmprune.integrity.state_sha256(model)
    res = invoke("eval", "--model", out, "--eval", "wikitext2", "--max-eval-windows", 2, "--data-dir", ddir,
                 "--no-progress", "--device", "cpu", "--dtype", "float32", "--report", tmp_path / "eval.json")
    assert res.exit_code == 0, res.output
    again = json.loads((tmp_path / "eval.json").read_text())["perplexity"]["wikitext2"]["perplexity"]
    assert again == pytest.approx(report["perplexity"]["wikitext2"]["pruned"], rel=1e-5)


@pytest.mark.parametrize("args,msg", [
    (["--structure", "mlp,rows", "--remove", "0.2"], "--structure: unknown structure 'rows'"),
    (["--allocation", "adaptive"], "--allocation set structured pruning: add --structure"),
    (["--structure", "mlp", "--remove", "0.2", "--objective", "post-norm", "--restore", "bias"],
     "not --restore bias"),
    (["--structure", "mlp", "--remove", "1.5"], "--remove is the fraction"),
    (["--structure", "mlp", "--remove", "0.2", "--pattern", "2:4"], "--pattern 2:4 is for sparse masks"),
    (["--structure", "mlp", "--remove", "0.2", "--update", "lsq"], "restoration is --restore"),
    (["--remove", "0.2"], "--remove set structured pruning: add --structure"),
    (["--structure", "mlp"], "needs --remove FRACTION"),
])
def test_cli_refuses_bad_structured_options(args, msg, tmp_path):
    res = invoke("prune", "--model", tmp_path / "nowhere", *args)
    assert res.exit_code == 2 and msg in res.output.replace("\n", " ")
    assert len(res.output.strip().splitlines()) == 1


def test_cli_refuses_an_unsupported_architecture(tmp_path, tokenizer, ddir):
    folder = tmp_path / "tiny-opt"
    tiny_model("opt").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    res = invoke("prune", "--model", folder, "--structure", "mlp", "--remove", 0.2, "--eval", "", "--nsamples", 2,
                 "--seqlen", 16, "--data-dir", ddir, "--device", "cpu", "--no-progress")
    assert res.exit_code == 2 and "--structure: structured pruning supports" in res.output
    assert "OPTForCausalLM" in res.output


def test_compare_lists_a_structured_run(tiny_folder, tmp_path, ddir):
    from llmprune.compare import runs_of

    rep = tmp_path / "run.json"
    res = invoke("prune", "--model", tiny_folder, "--structure", "mlp", "--remove", 0.25, "--width-multiple", 8,
                 "--importance", "magnitude", "--eval", "wikitext2", "--max-eval-windows", 1, "--seqlen", 32,
                 "--report", rep, "--data-dir", ddir, "--no-progress", "--device", "cpu", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    report = json.loads(rep.read_text())
    assert report["calibration"] is None  # magnitude without restoration: no calibration forward
    dense, pruned = runs_of([report])
    assert dense["method"] == "dense" and pruned["pattern"] == "mlp"
    assert pruned["sparsity"] == pytest.approx(report["structured"]["removed_fraction"])
