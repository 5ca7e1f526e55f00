import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmprune
from llmprune import UsageError
from llmprune.export import REPORT_NAME, check_output_dir, save_pruned

from .conftest import random_tokens, tiny_model


def test_save_load_keeps_every_zero(tmp_path, tokenizer):
    model = tiny_model("llama")
    llmprune.prune(model, calib_tokens=random_tokens(4, 32), pattern="2:4", device=torch.device("cpu"), progress=False)
    out = save_pruned(model, tokenizer, tmp_path / "out", {"method": "wanda"})
    loaded = AutoModelForCausalLM.from_pretrained(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / REPORT_NAME).read_text())["method"] == "wanda"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_failed_save_leaves_nothing(tmp_path, monkeypatch, tokenizer):
    model = tiny_model("llama")

    def broken(self, path, *a, **k):
        (path / "model.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (path / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(UsageError, match="no space left on the device; free some space"):
        save_pruned(model, tokenizer, tmp_path / "out", {})
    assert list(tmp_path.iterdir()) == []


def test_output_checks(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="is an existing file"):
        check_output_dir(f)
    full = tmp_path / "full"
    full.mkdir()
    (full / "a").write_text("x")
    with pytest.raises(UsageError, match="pass --overwrite"):
        check_output_dir(full)
    assert check_output_dir(full, overwrite=True) == full
    with pytest.raises(UsageError, match="parent folder .* does not exist"):
        check_output_dir(tmp_path / "no" / "such")
