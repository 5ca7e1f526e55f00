"""Saved outputs carry a sha256 manifest; incomplete or altered ones are refused on load; safe loading."""

import json
import pickle

import numpy as np
import pytest
import torch

import llmprune
from llmprune import UsageError, data
from llmprune.export import MANIFEST_NAME, REPORT_NAME, save_pruned
from llmprune.integrity import state_sha256, verify_output

from .conftest import tiny_model


@pytest.fixture
def saved(tmp_path, tokenizer):
    model = tiny_model("llama")
    return save_pruned(model, tokenizer, tmp_path / "out", {"method": "wanda"}), model


def test_manifest_lists_every_file_and_loads(saved):
    out, model = saved
    files = json.loads((out / MANIFEST_NAME).read_text())["files"]
    assert {"model.safetensors", "config.json", "tokenizer.json", REPORT_NAME} <= set(files)
    assert set(files) == {p.name for p in out.iterdir()} - {MANIFEST_NAME}
    loaded, _, _ = llmprune.load_model(str(out), progress=False)
    assert state_sha256(loaded) == state_sha256(model)


def test_altered_file_is_refused(saved):
    out, _ = saved
    path = out / "model.safetensors"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    path.write_bytes(bytes(blob))
    with pytest.raises(UsageError, match="model.safetensors does not match its checksum .* prune again"):
        llmprune.load_model(str(out), progress=False)


def test_missing_file_is_refused(saved):
    out, _ = saved
    (out / "model.safetensors").unlink()
    with pytest.raises(UsageError, match="model.safetensors is missing \\(the output is incomplete\\)"):
        verify_output(out)


def test_added_file_and_missing_manifest_are_refused(saved):
    out, _ = saved
    (out / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(UsageError, match="extra.safetensors is not in"):
        verify_output(out)
    (out / "extra.safetensors").unlink()
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(UsageError, match="without llmprune_manifest.json, so it may be incomplete"):
        verify_output(out)


def test_pt_token_file_is_loaded_without_unpickling_objects(tmp_path):
    good = tmp_path / "t.pt"
    torch.save(torch.arange(12).reshape(3, 4), good)
    assert torch.equal(data.load_token_file(good, 100), torch.arange(12).reshape(3, 4))

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UsageError, match="other pickled objects are never loaded"):
        data.load_token_file(evil, 100)
    assert not marker.exists()
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="cannot read it as a .npy array"):
        data.load_token_file(tmp_path / "obj.npy", 100)


def test_remote_code_runs_only_with_the_flag(tmp_path, tokenizer):
    folder = tmp_path / "custom"
    tiny_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    marker = tmp_path / "code-ran"
    (folder / "custom_model.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "from transformers import LlamaForCausalLM, LlamaConfig\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "custom_model.CustomConfig", "AutoModelForCausalLM": "custom_model.CustomForCausalLM"}
    cfg["model_type"] = "custom-llama"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UsageError, match="needs its own Python code to run; llmprune runs it only with --trust-remote-code"):
        llmprune.load_model(str(folder), progress=False)
    assert not marker.exists()
    model, _, _ = llmprune.load_model(str(folder), trust_remote_code=True, progress=False)
    assert marker.exists() and type(model).__name__ == "CustomForCausalLM"


def test_state_sha256_by_hand():
    import hashlib

    lin = torch.nn.Linear(2, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.arange(6.0).reshape(3, 2))
        lin.bias.zero_()
    lines = ""
    for name in ("bias", "weight"):  # name order
        t = getattr(lin, name).detach()
        lines += f"{name}|{t.dtype}|{tuple(t.shape)}|{hashlib.sha256(t.numpy().tobytes()).hexdigest()}\n"
    assert state_sha256(lin) == hashlib.sha256(lines.encode()).hexdigest()
    with torch.no_grad():
        lin.bias[0] = -0.0  # one sign bit differs: another hash
    assert state_sha256(lin) != hashlib.sha256(lines.encode()).hexdigest()


def test_state_sha256_takes_known_digests_and_they_match_the_written_shard(tmp_path):
    import hashlib

    from llmprune.layout import write_shard

    model = tiny_model("llama")
    state = {n: t.detach() for n, t in model.state_dict().items() if n.startswith("model.layers.0.")}
    record = write_shard(tmp_path / "block.safetensors", state)
    # each recorded digest is the sha256 of that tensor's bytes, as state_sha256 computes them
    assert record["tensor_sha256"] == {n: hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()
                                       for n, t in sorted(state.items())}
    assert state_sha256(model, record["tensor_sha256"]) == state_sha256(model)
    name = sorted(state)[0]  # a known digest is taken as it is, not recomputed
    assert state_sha256(model, {name: "0" * 64}) != state_sha256(model)
