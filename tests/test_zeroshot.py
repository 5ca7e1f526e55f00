"""Zero-shot evaluation through lm-evaluation-harness: the local task definitions, the whole path on a
tiny in-process model (checked against a hand-written log-likelihood scorer), the CLI and `compare`."""

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from .conftest import tiny_model
from llmprune import zeroshot
from llmprune.cli import app
from llmprune.errors import UsageError

runner = CliRunner()
CPU = ("--device", "cpu", "--dtype", "float32", "--no-progress")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def manager(ddir):
    return zeroshot.task_manager(ddir)


_TASKS = {}


def load_task(manager, name):
    if name not in _TASKS:
        (_TASKS[name],) = manager.load([name])["tasks"].values()
    return _TASKS[name]


# task -> (examples, {index: gold index})  hand-checked against the files
EXPECTED = {
    "boolq": (3270, {0: 0, 1: 1, 2: 1}),           # "false", "true", "true"
    "rte": (277, {0: 1, 1: 0, 2: 1}),              # not_entailment -> "False" (1)
    "hellaswag": (10042, {0: 3, 1: 3}),
    "winogrande": (1267, {0: 1, 1: 0, 2: 1}),      # dev-labels.lst: 2, 1, 2
    "arc_easy": (2376, {0: 0, 14: 1, 62: 3}),      # "A"; numeric keys "2" and "4"
    "arc_challenge": (1172, {0: 2, 44: 1, 128: 3}),
    "openbookqa": (500, {0: 1, 1: 0, 2: 2}),
    "piqa": (1838, {0: 0, 1: 1, 2: 1}),
}


@pytest.mark.parametrize("name", zeroshot.TASKS)
def test_local_task_count_and_gold(manager, name):
    task = load_task(manager, name)
    docs = list(task.eval_docs)
    count, golds = EXPECTED[name]
    assert len(docs) == count
    for index, gold in golds.items():
        doc = docs[index]
        if name == "winogrande":  # partial scoring: the gold is the index of the right context
            assert task.doc_to_text(doc) == gold and len(task.doc_to_choice(doc)) == 2
        else:
            assert task.doc_to_target(doc) == gold or int(task.doc_to_target(doc)) == gold


def test_hand_checked_prompts(manager):
    rte = list(load_task(manager, "rte").eval_docs)[1]
    task = load_task(manager, "rte")
    assert task.doc_to_text(rte) == ("Yet, we now are discovering that antibiotics are losing their effectiveness against "
                                     "illness. Disease-causing bacteria are mutating faster than we can come up with new "
                                     "antibiotics to fight the new variations.\nQuestion: Bacteria is winning the war "
                                     "against antibiotics. True or False?\nAnswer:")
    assert task.doc_to_choice(rte) == ["True", "False"]
    hs = load_task(manager, "hellaswag")
    doc = list(hs.eval_docs)[0]
    assert hs.doc_to_text(doc) == "Roof shingle removal: A man is sitting on a roof. he"
    assert hs.doc_to_choice(doc)[3] == "starts pulling up roofing on a roof."
    wg = load_task(manager, "winogrande")
    doc = list(wg.eval_docs)[0]
    assert wg.doc_to_choice(doc) == ["Sarah was a much better surgeon than Maria so Sarah",
                                     "Sarah was a much better surgeon than Maria so Maria"]
    assert wg.doc_to_target(doc) == "always got the easier cases."
    ob = load_task(manager, "openbookqa")
    doc = list(ob.eval_docs)[1]
    assert ob.doc_to_text(doc) == "There is most likely going to be fog around:"
    assert ob.doc_to_choice(doc) == ["a marsh", "a tundra", "the plains", "a desert"]


class _Tags(yaml.SafeLoader):
    pass


_Tags.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")

LM_EVAL_YAML = {"boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml",
                "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                "openbookqa": "openbookqa/openbookqa.yaml", "piqa": "piqa/piqa.yaml"}


def _read_yaml(path: Path) -> dict:
    cfg = yaml.load(path.read_text(), Loader=_Tags)
    if "include" in cfg:
        base = _read_yaml(path.parent / cfg.pop("include"))
        cfg = {**base, **cfg}
    return cfg


@pytest.mark.parametrize("name", zeroshot.TASKS)
def test_same_prompts_and_metrics_as_lm_eval(name):
    """The shipped configs keep lm-eval's own prompt, choices, target, metrics and version."""
    import lm_eval

    ours = _read_yaml(zeroshot.TASK_DIR / f"{name}.yaml")
    theirs = _read_yaml(Path(lm_eval.__file__).parent / "tasks" / LM_EVAL_YAML[name])
    assert ours["task"] == theirs["task"] == name
    keys = ["output_type", "metric_list", "metadata"]
    if name != "winogrande":  # winogrande reads a converted file: the same choices/target built by other functions
        keys += ["doc_to_text", "doc_to_target", "doc_to_choice"]
    for key in keys:
        assert ours[key] == theirs[key], key
    split = "test" if "test_split" in ours else "validation"
    assert theirs.get(f"{split}_split") == split and not (split == "validation" and theirs.get("test_split"))


def test_missing_file_names_it_and_the_flag(tmp_path):
    (tmp_path / "rte").mkdir()
    with pytest.raises(UsageError, match=r"boolq/val\.jsonl.*--data-dir"):
        zeroshot.check_local_data(("boolq",), tmp_path)
    res = invoke("eval", "--model", "unused-never-loaded", "--tasks", "rte,boolq", "--data-dir", tmp_path, *CPU)
    assert res.exit_code == 2
    assert "rte/val.jsonl" in res.output and "--data-dir" in res.output


def test_unknown_task_and_bad_limit():
    with pytest.raises(UsageError, match="unknown task 'mmlu'"):
        zeroshot.split_task_list("boolq,mmlu")
    with pytest.raises(UsageError, match="--limit"):
        zeroshot.ZeroShotSettings(("rte",), limit=0)
    assert zeroshot.split_task_list("wikitext2, rte,ptb,piqa") == (("wikitext2", "ptb"), ("rte", "piqa"))


def test_import_llmprune_does_not_import_lm_eval():
    code = ("import sys, llmprune, llmprune.cli, llmprune.zeroshot, llmprune.compare; "
            "bad = [m for m in ('lm_eval', 'matplotlib', 'datasets') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context), tokenized as lm-eval's HFLM does it."""
    spaces = len(context) - len(context.rstrip())
    if spaces:  # lm-eval moves trailing spaces of the context onto the continuation
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_tiny_model_end_to_end_matches_hand_scoring(ddir, tokenizer, manager, monkeypatch):
    """The whole path on an in-process model, with the network cut: acc equals a hand-written scorer's."""
    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    model = tiny_model("llama", seed=3)
    settings = zeroshot.ZeroShotSettings(("rte", "arc_easy", "winogrande"), limit=6)
    out = zeroshot.evaluate_zero_shot(model, tokenizer, settings, ddir, progress=False, manager=manager)
    assert out["harness"]["lm_eval"] == zeroshot.harness_version() and out["harness"]["num_fewshot"] == 0
    for name in settings.tasks:
        r = out["tasks"][name]
        assert r["samples"] == 6 and r["version"] == 1.0 and r["source"].startswith("local:")
    assert out["tasks"]["arc_easy"]["acc_norm"] is not None and out["tasks"]["rte"]["acc_norm"] is None
    assert out["mean"]["acc"] == pytest.approx(sum(out["tasks"][t]["acc"] for t in settings.tasks) / 3)

    for name in ("rte", "arc_easy"):  # second path: score every choice by hand
        task = load_task(manager, name)
        correct, correct_norm = 0, 0
        for doc in list(task.eval_docs)[:6]:
            ctx = task.doc_to_text(doc)
            choices = task.doc_to_choice(doc)
            ll = [_loglikelihood(model, tokenizer, ctx, " " + c) for c in choices]
            gold = int(task.doc_to_target(doc))
            correct += int(max(range(len(ll)), key=ll.__getitem__) == gold)
            norm = [v / len(" " + c) for v, c in zip(ll, choices)]
            correct_norm += int(max(range(len(norm)), key=norm.__getitem__) == gold)
        assert out["tasks"][name]["acc"] == pytest.approx(correct / 6), name
        if name == "arc_easy":
            assert out["tasks"][name]["acc_norm"] == pytest.approx(correct_norm / 6)


def test_cli_prune_eval_and_compare(tiny_folder, tmp_path, ddir):
    runs = []
    for method, pattern in (("wanda", "unstructured"), ("magnitude", "2:4")):
        rep = tmp_path / f"{method}.json"
        res = invoke("prune", "--model", tiny_folder, "--method", method, "--pattern", pattern, "--nsamples", 2,
                     "--seqlen", 32, "--eval", "wikitext2", "--max-eval-windows", 2, "--eval-tasks", "rte,piqa",
                     "--limit", 3, "--report", rep, "--data-dir", ddir, *CPU)
        assert res.exit_code == 0, res.output
        report = json.loads(rep.read_text())
        zs = report["zero_shot"]
        assert zs["harness"]["limit"] == 3 and set(zs["tasks"]) == {"rte", "piqa"}
        for task in zs["tasks"].values():
            assert task["samples"] == 3 and 0 <= task["dense"]["acc"] <= 1 and 0 <= task["pruned"]["acc"] <= 1
        assert set(zs["mean"]) == {"dense", "pruned"}
        runs.append(rep)
    # the dense numbers do not depend on the method that follows
    a, b = (json.loads(p.read_text()) for p in runs)
    assert a["zero_shot"]["mean"]["dense"] == b["zero_shot"]["mean"]["dense"]

    ev = tmp_path / "eval.json"
    res = invoke("eval", "--model", tiny_folder, "--tasks", "rte,wikitext2", "--limit", 2, "--eval-seqlen", 32,
                 "--max-eval-windows", 2, "--report", ev, "--data-dir", ddir, *CPU)
    assert res.exit_code == 0, res.output
    report = json.loads(ev.read_text())
    assert report["zero_shot"]["tasks"]["rte"]["samples"] == 2 and "wikitext2" in report["perplexity"]

    plots = tmp_path / "plots"
    res = runner.invoke(app, ["compare", *map(str, runs), str(ev), "--plots", str(plots)], env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    body = [l for l in res.output.splitlines() if "│" in l and any(w in l for w in ("dense", "wanda", "magnitude", "eval"))]
    assert "dense" in body[0] and "magnitude" in body[1] and "wanda" in body[2] and "eval" in body[3]
    for name in ("perplexity_vs_sparsity.png", "layer_sparsity.png"):
        data = (plots / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert not (plots / "layer_error.png").exists()  # no report records a reconstruction error


def test_compare_table_rows_and_error_plot(tmp_path):
    from llmprune import compare

    def prune_report(method, pattern, sparsity, ppl, err=None):
        layers = [{"name": f"l{i}", "shape": [4, 4], "sparsity": sparsity} | ({"reconstruction_error": err * (i + 1)}
                                                                            if err else {}) for i in range(3)]
        return {"model": {"spec": "m"}, "method": method, "pattern": pattern, "sparsity_overall": sparsity,
                "layers": layers, "perplexity": {"wikitext2": {"dense": 10.0, "pruned": ppl, "seqlen": 8, "windows": 1}}}

    paths = []
    for i, rep in enumerate([prune_report("sparsegpt", "2:4", 0.5, 30.0, err=0.1), prune_report("wanda", "unstructured", 0.5, 20.0),
                             prune_report("wanda", "2:4", 0.5, 40.0)]):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(rep))
    rows, columns = compare.table_rows(compare.load_reports(paths))
    assert [(r["method"], r["pattern"]) for r in rows] == [("dense", "-"), ("wanda", "unstructured"), ("wanda", "2:4"),
                                                           ("sparsegpt", "2:4")]
    assert columns == ["ppl wikitext2"] and rows[0]["metrics"]["ppl wikitext2"] == 10.0
    written = compare.write_plots(compare.load_reports(paths), tmp_path / "p")
    assert [p.name for p in written] == ["perplexity_vs_sparsity.png", "layer_sparsity.png", "layer_error.png"]
    assert all(p.stat().st_size > 5000 for p in written)
    with pytest.raises(UsageError, match="not an llmprune report"):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        compare.load_reports([bad])


def test_without_data_dir_the_standard_hub_task_is_used(tokenizer, tmp_path):
    """No data directory: lm-eval's own task (its hub dataset); offline that is one clear error, not a hang."""
    tokenizer.save_pretrained(tmp_path / "tok")
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from transformers import AutoTokenizer
from tests.conftest import tiny_model
from llmprune import zeroshot
from llmprune.errors import UsageError
tok = AutoTokenizer.from_pretrained({str(tmp_path / "tok")!r})
try:
    zeroshot.evaluate_zero_shot(tiny_model("llama"), tok, zeroshot.ZeroShotSettings(("rte",), limit=2), None, progress=False)
except UsageError as exc:
    print("usage-error:", exc)
"""
    env = {k: v for k, v in __import__("os").environ.items() if k != "LLMPRUNE_DATA_DIR"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300).stdout
    assert "usage-error: zero-shot task rte" in out and "nyu-mll/glue" in out and "--data-dir" in out, out


def test_uniform_logits_perplexity_is_vocabulary_size(tokenizer, ddir):
    """The perplexity sets keep going through llmprune's own code: a model whose logits are all equal
    has perplexity exactly its vocabulary size on every set (through the public API, real data)."""
    import llmprune
    from llmprune import EvalSettings

    from .conftest import VOCAB

    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.zero_()
    out = llmprune.evaluate_perplexity(model, tokenizer, EvalSettings(("wikitext2", "ptb"), seqlen=32, max_windows=3),
                                       "cpu", ddir, progress=False)
    for name in ("wikitext2", "ptb"):
        assert out[name].perplexity == pytest.approx(VOCAB, rel=1e-5) and out[name].windows == 3


def test_no_git_noise_outside_a_checkout(ddir, tokenizer, manager, tmp_path, monkeypatch, capfd):
    """lm-eval runs `git describe` for its version stamp; outside a checkout git said `fatal: not a git
    repository` once per task."""
    monkeypatch.chdir(tmp_path)
    settings = zeroshot.ZeroShotSettings(("rte", "piqa"), limit=1)
    zeroshot.evaluate_zero_shot(tiny_model("llama"), tokenizer, settings, ddir, progress=False, manager=manager)
    assert "not a git repository" not in capfd.readouterr().err
