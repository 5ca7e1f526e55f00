"""Blocks streamed from the safetensors files and saved shard by shard give the in-memory result."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmprune
from llmprune import export, streaming
from llmprune.checkpoint import read_state
from llmprune.cli import app

from .conftest import random_tokens, tiny_model


def _saved(tmp_path, tokenizer=None):
    path = tmp_path / "src"
    tiny_model("llama", layers=3).save_pretrained(path, max_shard_size="40KB")  # several shards, blocks split across
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_streamed_prune_writes_the_in_memory_result(tmp_path, method):
    src = _saved(tmp_path)
    assert len(json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    tokens = random_tokens(4, 16)
    ref = AutoModelForCausalLM.from_pretrained(src)
    llmprune.prune(ref, calib_tokens=tokens, method=method, device=torch.device("cpu"), batch_size=2, progress=False)

    model, reader = streaming.open_model(src, torch.float32)
    work = tmp_path / "work"
    llmprune.prune(model, calib_tokens=tokens, method=method, device=torch.device("cpu"), batch_size=2,
                   progress=False, placement=streaming.DiskBlocks(model, reader), checkpoint_dir=work)
    assert all(p.is_meta for b in model.model.layers for p in b.parameters())  # nothing of a block stays in memory
    export.seal(export.finish_dense(work, model, None, read_state(work)["shards"]), tmp_path / "out", {})
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == [
        "model-block-00000.safetensors", "model-block-00001.safetensors", "model-block-00002.safetensors",
        "model-stem.safetensors"]
    assert not work.exists()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    want = ref.state_dict()
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_cli_stream_from_disk(tmp_path, tokenizer):
    src = _saved(tmp_path, tokenizer)
    tokens = tmp_path / "t.npy"
    np.save(tokens, np.random.default_rng(0).integers(3, 300, (4, 16)))
    runner = CliRunner()
    common = ["prune", "--model", str(src), "--calib-tokens", str(tokens), "--no-progress", "--device", "cpu",
              "--dtype", "float32", "--batch-size", "2"]
    res = runner.invoke(app, common + ["--stream-from-disk", "--eval", "", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, common + ["--eval", "", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((tmp_path / "a" / "llmprune_report.json").read_text())["model"]["streamed"] is True
    assert not list(tmp_path.glob(".a.*"))  # no temporary copy, no work folder left
    res = runner.invoke(app, common + ["--stream-from-disk", "--out", str(tmp_path / "c")])
    assert res.exit_code == 2 and "--eval ''" in res.output
