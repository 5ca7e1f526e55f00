import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import llmprune
from llmprune import UsageError, layout
from llmprune.checkpoint import read_state
from llmprune.cli import app
from llmprune.export import REPORT_NAME, check_output_dir, finish_dense, save_pruned, seal
from llmprune.integrity import state_sha256, verify_output
from llmprune.layout import INDEX

from .conftest import ARCHS, random_tokens, tiny_model


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


def _tiny(arch: str):
    if arch != "phi":
        return tiny_model(arch, layers=2)
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.PhiConfig(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("arch", [*ARCHS, "phi"])
def test_block_shards_become_a_folder_that_loads_as_the_pruned_model(arch, tmp_path, tokenizer):
    model, work = _tiny(arch), tmp_path / "work"
    llmprune.prune(model, calib_tokens=random_tokens(4, 16), device=torch.device("cpu"), batch_size=2,
                   progress=False, checkpoint_dir=work)
    if arch == "gpt_neox":  # transformers saves its lm_head as embed_out: saved with save_pretrained instead
        assert not layout.direct_layout_supported(model)
        return
    assert layout.direct_layout_supported(model)
    out = seal(finish_dense(work, model, tokenizer, read_state(work)["shards"]), tmp_path / "out", {"method": "wanda"})
    ref = save_pruned(model, tokenizer, tmp_path / "ref", {"method": "wanda"})
    for loaded in (AutoModelForCausalLM.from_pretrained(out), llmprune.load(out)):
        assert state_sha256(loaded) == state_sha256(model)
    names = {p.name for p in out.iterdir()} - {p.name for p in ref.iterdir()}
    assert names == {f"model-block-0000{i}.safetensors" for i in range(2)} | {"model-stem.safetensors", INDEX}
    for name in ("config.json", "generation_config.json"):
        assert (out / name).is_file() == (ref / name).is_file(), name
        if (ref / name).is_file():
            assert json.loads((out / name).read_text()) == json.loads((ref / name).read_text()), name
    verify_output(out)


def test_renamed_keys_fall_back_to_save_pretrained(tmp_path, tokenizer, ddir):
    src = tmp_path / "neox"
    tiny_model("gpt_neox", layers=2).save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["prune", "--model", str(src), "--nsamples", "4", "--seqlen", "16", "--eval", "",
                                   "--data-dir", str(ddir), "--no-progress", "--device", "cpu", "--dtype", "float32",
                                   "--out", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and not list(out.glob("model-block-*"))
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["weights_sha256"] == state_sha256(AutoModelForCausalLM.from_pretrained(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neox", "out"]  # work folder and temporary copy gone


def _bytes_written_by_process() -> int:
    for line in open("/proc/self/io"):
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise KeyError("wchar")


@pytest.mark.skipif(not os.path.exists("/proc/self/io"), reason="needs Linux /proc/self/io")
def test_out_writes_the_weights_once(tiny_folder, tmp_path, ddir):
    out = tmp_path / "out"
    args = ["prune", "--model", str(tiny_folder), "--method", "sparsegpt", "--nsamples", "4", "--seqlen", "16",
            "--eval", "", "--data-dir", str(ddir), "--no-progress", "--device", "cpu", "--dtype", "float32",
            "--out", str(out)]
    before = _bytes_written_by_process()
    res = CliRunner().invoke(app, args, catch_exceptions=False)
    written = _bytes_written_by_process() - before  # every write(2) of the process, its writer thread included
    assert res.exit_code == 0, res.output
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["bytes_written"] <= written <= 1.2 * size, (report["bytes_written"], written, size)
    assert report["time"]["save_s"] >= 0
    print(f"bytes written {written} (report: {report['bytes_written']}), output {size}")


def test_shards_are_safetensors_files_with_their_sha256(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from llmprune.integrity import file_sha256

    tensors = {"b.w": torch.randn(3, 5).bfloat16(), "a.w": torch.randn(7), "n": torch.tensor(3),
               "m": torch.tensor([True, False, True]), "h": torch.randn(2, 2).half()}
    record = layout.write_shard(tmp_path / "x.safetensors", tensors)
    loaded = load_file(tmp_path / "x.safetensors")
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert all(loaded[k].dtype == tensors[k].dtype and loaded[k].shape == tensors[k].shape for k in tensors)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert record["sha256"] == file_sha256(tmp_path / "x.safetensors")
    assert record["bytes"] == (tmp_path / "x.safetensors").stat().st_size and record["tensors"] == sorted(tensors)


@pytest.mark.parametrize("fmt", ["dense", "compressed"])
def test_saved_files_share_one_mode(tiny_folder, tmp_path, fmt):
    """transformers writes model.safetensors 0600 while every other file was 0644."""
    import os
    import stat

    from llmprune.cli import run

    out = tmp_path / "out"
    args = ["prune", "--model", str(tiny_folder), "--method", "magnitude", "--eval", "", "--out", str(out),
            "--no-progress", "--device", "cpu", "--format", fmt]
    if fmt == "compressed":
        args += ["--pattern", "2:4"]
    assert run(args) == 0
    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir() if p.is_file()}
    assert set(modes.values()) == {0o666 & ~mask}, modes
