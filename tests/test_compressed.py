"""Compressed storage: bit-exact round trips, sizes, and refusals of bad or damaged files."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import llmprune
from llmprune import NM, Unstructured, UsageError, compressed
from llmprune.cli import app
from llmprune.export import save_pruned

from .conftest import random_tokens, tiny_model

CPU = torch.device("cpu")


def canonical_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits, with -0.0 counted as +0.0 (pruned weights decode as +0.0)."""
    t = torch.where(t == 0, torch.zeros_like(t), t) if t.is_floating_point() else t
    return t.contiguous().view(torch.uint8)


def pruned(pattern, dtype=torch.float32, seed=0):
    model = tiny_model("llama", seed=seed)
    llmprune.prune(model, calib_tokens=random_tokens(4, 32), pattern=pattern, device=CPU, progress=False)
    return model.to(dtype)


def assert_identical(a, b):
    """Every tensor of the two state dicts the same bits (no -0.0 allowance)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name].contiguous().view(torch.uint8), sb[name].contiguous().view(torch.uint8)), name


def assert_bit_exact(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(canonical_bits(sa[name]), canonical_bits(sb[name])), name


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_bits_round_trip(bits):
    codes = torch.randint(0, 2**bits, (37,), generator=torch.Generator().manual_seed(bits))
    packed = compressed.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-37 * bits // 8)
    assert torch.equal(compressed.unpack_bits(packed, bits, 37), codes.int())


def test_pack_bits_layout_by_hand():
    # 2-bit codes 1, 2, 3, 0 -> 0b00_11_10_01 (first code in the lowest bits)
    assert compressed.pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]


def test_nm_encoding_by_hand():
    w = torch.tensor([[0.0, 5.0, 0.0, -1.0, 0.0, 0.0, 0.0, 2.0]])
    parts, meta = compressed.encode_nm(w, NM(2, 4), "w")
    assert parts["nm_values"].tolist() == [[5.0, -1.0, 0.0, 2.0]]  # group 2 pads with its first zero slot
    assert compressed.unpack_bits(parts["nm_index"], 2, 4).tolist() == [1, 3, 0, 3]
    assert torch.equal(compressed.decode_nm(parts, meta, (1, 8), "w"), w)


@pytest.mark.parametrize("pattern", [NM(2, 4), NM(1, 4), NM(4, 8), Unstructured(0.5)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_round_trip_bit_exact(tmp_path, tokenizer, pattern, dtype):
    model = pruned(pattern, dtype)
    out = save_pruned(model, tokenizer, tmp_path / "c", {"pattern": str(pattern)}, format="compressed", pattern=pattern)
    assert (out / compressed.WEIGHTS_NAME).is_file() and not (out / "model.safetensors").exists()
    loaded = llmprune.load(out)
    assert_bit_exact(model, loaded)
    if dtype == torch.float32:  # (in bf16 the rotary buffer, not stored, differs: the original was cast whole)
        loaded.set_attn_implementation("eager")  # as the tiny model runs
        with torch.no_grad():
            ids = random_tokens(2, 12)
            assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    storage = json.loads((out / "llmprune_report.json").read_text())["storage"]
    if dtype == torch.bfloat16 and str(pattern) in ("2:4", "unstructured"):
        assert storage["linear_ratio"] == pytest.approx(0.5625, abs=2e-3)  # 50% values + 1 bit per weight
    assert storage["linear_ratio"] <= {"2:4": 0.6, "1:4": 0.35, "4:8": 0.7, "unstructured": 0.6}[str(pattern)] + (
        0.04 if dtype == torch.float32 else 0.0)


@pytest.mark.parametrize("arch", ["gemma3", "opt"])
def test_round_trip_other_architectures(tmp_path, arch):
    model = tiny_model(arch)
    llmprune.prune(model, calib_tokens=random_tokens(4, 32), pattern="2:4", device=CPU, progress=False)
    out = save_pruned(model, None, tmp_path / "c", {}, format="compressed", pattern=NM(2, 4))
    loaded = llmprune.load(out)
    assert_bit_exact(model, loaded)
    if arch == "gemma3":  # tied embeddings are stored once and tied again on load
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_csr_where_smaller():
    w = torch.zeros(64, 256)  # bitmask: 2048 bytes; CSR: 3 x (4 + 2) + 65 x 8 = 538 bytes
    w[3, 5], w[3, 7], w[63, 255] = 1.5, -2.0, 3.0
    parts, meta = compressed.encode_sparse(w)
    assert meta["encoding"] == "csr" and parts["csr_rows"][3:5].tolist() == [0, 2]
    assert torch.equal(compressed.decode_sparse(parts, meta, (64, 256), torch.float32, "w"), w)
    dense_half = torch.randn(8, 64) * (torch.rand(8, 64) > 0.5)
    assert compressed.encode_sparse(dense_half)[1]["encoding"] == "bitmask"


def test_refuses_weights_that_break_the_pattern(tmp_path, tokenizer):
    model = pruned("2:4")
    q = model.model.layers[1].self_attn.q_proj.weight
    with torch.no_grad():
        q[2, 4:8] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    with pytest.raises(UsageError, match=r"q_proj.weight is not 2:4 sparse: row 2, columns 4..7 hold 3 non-zeros"):
        save_pruned(model, tokenizer, tmp_path / "c", {}, format="compressed", pattern=NM(2, 4))
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    # the same weights saved dense with a 2:4 report are refused on load
    out = save_pruned(model, tokenizer, tmp_path / "d", {"pattern": "2:4"})
    with pytest.raises(UsageError, match="hold 3 non-zeros"):
        llmprune.load(out)


def _rewrite(path, edit):
    """Re-write a compressed file after ``edit(tensors, entries)``, with fresh checksums (a valid-looking file)."""
    with safe_open(path, framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    entries = json.loads(header["tensors"])
    edit(tensors, entries)
    for name, meta in entries.items():
        for part in meta.get("sha256", {}):
            meta["sha256"][part] = compressed._sha(tensors[f"{name}.{part}"])
    save_file(tensors, path, metadata={**header, "tensors": json.dumps(entries)})


def test_refuses_index_that_breaks_the_pattern(tmp_path, tokenizer):
    out = save_pruned(pruned("2:4"), tokenizer, tmp_path / "c", {}, format="compressed", pattern=NM(2, 4))
    key = "model.layers.0.mlp.up_proj.weight.nm_index"

    def repeat_position(tensors, entries):  # first group: positions (0, 0) -> 3 values fall on 1 slot
        tensors[key] = tensors[key].clone()
        tensors[key][0] = tensors[key][0] & 0b11110000

    _rewrite(out / compressed.WEIGHTS_NAME, repeat_position)
    with pytest.raises(UsageError, match="model.llmprune.safetensors does not match its checksum"):
        llmprune.load(out)  # the folder's manifest sees the change first
    with pytest.raises(UsageError, match="up_proj.weight: the 2:4 index metadata is invalid"):
        llmprune.load(out, verify=False)


def test_refuses_corrupt_and_truncated_files(tmp_path, tokenizer):
    out = save_pruned(pruned("unstructured"), tokenizer, tmp_path / "c", {}, format="compressed",
                      pattern=Unstructured(0.5))
    path = out / compressed.WEIGHTS_NAME
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-100] ^= 0x01
    path.write_bytes(bytes(flipped))
    with pytest.raises(UsageError, match="does not match its checksum in llmprune_manifest.json"):
        llmprune.load(out)
    # the file's own checks, without the folder's manifest
    with pytest.raises(UsageError, match="fails its checksum; the file is corrupt"):
        llmprune.load(out, verify=False)
    path.write_bytes(good[: len(good) - 1000])
    with pytest.raises(UsageError, match="truncated or corrupt"):
        llmprune.load(out, verify=False)
    path.write_bytes(good)

    def drop_values(tensors, entries):
        name = "model.layers.1.self_attn.k_proj.weight"
        tensors[f"{name}.values"] = tensors[f"{name}.values"][:-1].clone()

    _rewrite(path, drop_values)
    with pytest.raises(UsageError, match="k_proj.weight: the bitmask marks .* values are stored"):
        llmprune.load(out, verify=False)


def test_cli_prune_compressed_then_eval(tiny_folder, tmp_path):
    from typer.testing import CliRunner

    runner = CliRunner()
    out = tmp_path / "c"
    res = runner.invoke(app, ["prune", "--model", str(tiny_folder), "--method", "magnitude", "--pattern", "2:4",
                              "--eval", "", "--out", str(out), "--format", "compressed", "--no-progress",
                              "--device", "cpu", "--dtype", "float32"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "pruned Linear weights:" in res.output
    assert json.loads((out / "llmprune_report.json").read_text())["storage"]["format"] == "compressed"
    model, tok, _ = llmprune.load_model(str(out), progress=False)
    assert int((model.model.layers[0].mlp.down_proj.weight == 0).sum()) == model.model.layers[0].mlp.down_proj.weight.numel() // 2
    res = runner.invoke(app, ["prune", "--model", str(tiny_folder), "--format", "zip", "--out", str(tmp_path / "z")])
    assert res.exit_code == 2 and "--format must be dense or compressed" in res.output


def test_compressed_and_dense_folders_reload_as_the_run_hashed_and_evaluate_alike(tiny_folder, tmp_path):
    """The compressed folder's report hash once differed from its reload (-0.0 against +0.0), and a bf16
    reload cast the rotary frequencies to bf16 where from_pretrained keeps them fp32 (277.472 vs 277.343)."""
    from llmprune.cli import run
    from llmprune.integrity import state_sha256

    outs = {}
    for fmt in ("dense", "compressed"):
        outs[fmt] = tmp_path / fmt
        assert run(["prune", "--model", str(tiny_folder), "--method", "magnitude", "--pattern", "2:4", "--eval", "",
                    "--out", str(outs[fmt]), "--format", fmt, "--no-progress", "--device", "cpu",
                    "--dtype", "float32"]) == 0
        report = json.loads((outs[fmt] / "llmprune_report.json").read_text())
        reloaded = llmprune.load(outs[fmt])
        assert state_sha256(reloaded) == report["weights_sha256"], fmt
        zeros = torch.cat([p.detach().reshape(-1) for p in reloaded.parameters()])
        assert not torch.signbit(zeros[zeros == 0]).any(), fmt
    dense, packed = (llmprune.load(outs[f], dtype=torch.bfloat16) for f in ("dense", "compressed"))
    assert {n: b.dtype for n, b in dense.named_buffers()} == {n: b.dtype for n, b in packed.named_buffers()}
    ids = torch.randint(3, 300, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, packed(ids).logits)


# ---------------------------------------------------------------- --permute: N:M in a stored input order


def pruned_permuted(arch="llama", dtype=torch.float32):
    """A tiny model pruned 2:4 by RIA on permuted input channels with the lsq update, and its result."""
    model = tiny_model(arch)
    res = llmprune.prune(model, calib_tokens=random_tokens(4, 32), method="ria", pattern="2:4", permute=True,
                         update="lsq", device=CPU, progress=False)
    return model.to(dtype), res


def test_permuted_encoding_by_hand():
    # 1:2 in the order (1, 2, 0, 3): groups (w1, w2) and (w0, w3); as stored, (w0, w1) holds two non-zeros
    w = torch.tensor([[5.0, -1.0, 0.0, 0.0]])
    perm = torch.tensor([1, 2, 0, 3])
    with pytest.raises(UsageError, match="is not 1:2 sparse"):
        compressed.encode_nm(w, NM(1, 2), "w")
    parts, meta = compressed.encode_permuted_nm(w, NM(1, 2), perm, "w")
    assert meta["encoding"] == "nm-permuted" and parts["perm"].dtype == torch.int16
    assert parts["perm"].tolist() == [1, 2, 0, 3] and parts["nm_values"].tolist() == [[-1.0, 5.0]]
    assert torch.equal(compressed.decode_permuted_nm(parts, meta, (1, 4), "w"), w)
    with pytest.raises(UsageError, match=r"w \(in its input permutation\) is not 1:2 sparse"):
        compressed.encode_permuted_nm(w, NM(1, 2), torch.tensor([0, 1, 2, 3]), "w")
    with pytest.raises(UsageError, match="its input permutation is not an order of its 4 columns"):
        compressed.encode_permuted_nm(w, NM(1, 2), torch.tensor([1, 1, 0, 3]), "w")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_permuted_round_trip_bit_exact(tmp_path, tokenizer, dtype):
    """--permute with --format compressed: each permuted weight stored 2:4 in its order with that order; the
    reload equals the dense pruned model bit for bit, in the stored (un-permuted) order, and gives the orders back."""
    model, res = pruned_permuted(dtype=dtype)
    perms = res.permutations()
    assert len(perms) == 14
    out = save_pruned(model, tokenizer, tmp_path / "c", {"pattern": "2:4"}, format="compressed", pattern=NM(2, 4),
                      perms=perms)
    assert_identical(model, llmprune.load(out))  # pruned weights are +0.0 on both sides: the runner wrote +0.0
    sa = model.state_dict()
    back = compressed.permutations(out)
    assert back.keys() == perms.keys() and all(torch.equal(back[k], perms[k]) for k in perms)
    with safe_open(out / compressed.WEIGHTS_NAME, framework="pt") as f:
        entries = json.loads(f.metadata()["tensors"])
        assert f.get_tensor("model.layers.0.mlp.down_proj.weight.perm").dtype == torch.int16
    down = entries["model.layers.0.mlp.down_proj.weight"]
    assert down["encoding"] == "nm-permuted" and set(down["sha256"]) == {"nm_values", "nm_index", "perm"}
    storage = json.loads((out / "llmprune_report.json").read_text())["storage"]
    weights = [sa[f"{k}.weight"] for k in perms]  # here every pruned Linear has an order
    # half the values, 2 bits per kept value (1 per weight), and one int16 per input column
    expected = sum(w.numel() * w.element_size() // 2 + w.numel() // 8 + w.shape[1] * 2 for w in weights)
    assert storage["linear_stored_bytes"] == expected


def test_permuted_round_trip_other_architecture(tmp_path):
    model, res = pruned_permuted("opt")
    out = save_pruned(model, None, tmp_path / "c", {}, format="compressed", pattern=NM(2, 4), perms=res.permutations())
    assert_identical(model, llmprune.load(out))
    assert compressed.permutations(out).keys() == res.permutations().keys()


def test_a_permuted_model_saved_without_its_orders_is_refused(tmp_path):
    model, _ = pruned_permuted()
    with pytest.raises(UsageError, match="is not 2:4 sparse: row"):
        save_pruned(model, None, tmp_path / "c", {}, format="compressed", pattern=NM(2, 4))
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_stored_order_that_is_not_a_permutation(tmp_path):
    model, res = pruned_permuted()
    out = save_pruned(model, None, tmp_path / "c", {}, format="compressed", pattern=NM(2, 4), perms=res.permutations())
    path, key = out / compressed.WEIGHTS_NAME, "model.layers.1.self_attn.o_proj.weight.perm"
    good = path.read_bytes()

    def repeat_column(tensors, entries):
        tensors[key] = tensors[key].clone()
        tensors[key][1] = tensors[key][0]

    readers = (lambda: llmprune.load(out, verify=False), lambda: compressed.permutations(out))
    _rewrite(path, repeat_column)  # valid checksums, a column twice
    for read in readers:
        with pytest.raises(UsageError, match="o_proj.weight: the stored input permutation is not an order"):
            read()
    path.write_bytes(good)
    with safe_open(path, framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = tensors[key].flip(0).contiguous()  # another order, its checksum not updated
    save_file(tensors, path, metadata=header)
    for read in readers:
        with pytest.raises(UsageError, match="o_proj.weight.perm fails its checksum"):
            read()


def test_an_unknown_encoding_is_refused():
    with pytest.raises(UsageError, match="an encoding this llmprune does not know \\('nm-rotated'\\)"):
        compressed._decode({}, {"encoding": "nm-rotated"}, (1, 4), torch.float32, "w", "f")


def test_dense_permuted_folder_loads_and_holds_no_orders(tmp_path):
    """A dense folder's weights are N:M only in orders it does not hold: those Linears (marked in the report) are
    not checked against the pattern, the others are; asking it for the orders is refused."""
    model, res = pruned_permuted()
    from llmprune import report as report_mod

    rows = [report_mod._layer_row(r) for r in res.layers]
    assert all(row["permuted"] for row in rows)
    out = save_pruned(model, None, tmp_path / "d", {"pattern": "2:4", "layers": rows})
    assert_bit_exact(model, llmprune.load(out))
    with pytest.raises(UsageError, match="does not hold the input permutations"):
        compressed.permutations(out)
    unmarked = save_pruned(model, None, tmp_path / "u", {"pattern": "2:4"})
    with pytest.raises(UsageError, match="is not 2:4 sparse"):
        llmprune.load(unmarked)


def test_cli_permute_compressed_reloads_as_the_dense_run(tiny_folder, tmp_path):
    """`prune --permute --format compressed` (the orders go through the run's checkpoint to the save) reloads bit
    for bit as the same run saved dense, and its report marks every permuted Linear."""
    from llmprune.cli import run
    from llmprune.integrity import state_sha256

    outs = {}
    for fmt in ("dense", "compressed"):
        outs[fmt] = tmp_path / fmt
        assert run(["prune", "--model", str(tiny_folder), "--method", "ria", "--pattern", "2:4", "--permute",
                    "--calib-tokens", str(_token_file(tmp_path)), "--eval", "", "--out", str(outs[fmt]),
                    "--format", fmt, "--no-progress", "--device", "cpu", "--dtype", "float32"]) == 0
    report = json.loads((outs["compressed"] / "llmprune_report.json").read_text())
    assert sum(bool(row.get("permuted")) for row in report["layers"]) == 21  # 3 blocks x 7 Linears
    dense, packed = llmprune.load(outs["dense"]), llmprune.load(outs["compressed"])
    assert_identical(dense, packed)
    assert state_sha256(packed) == report["weights_sha256"]
    assert len(compressed.permutations(outs["compressed"])) == 21


def _token_file(tmp_path):
    import numpy as np

    path = tmp_path / "calib.npy"
    if not path.exists():
        np.save(path, random_tokens(4, 32).numpy())
    return path


def test_permuted_alps_round_trip_bit_exact(tmp_path, tokenizer):
    """ALPS --permute: its weights are updated (not just masked) and 2:4 only in the recorded orders; the compressed
    folder stores them so and reloads them bit for bit."""
    model = tiny_model("llama")
    res = llmprune.prune(model, calib_tokens=random_tokens(4, 32), method="alps", pattern="2:4", permute=True,
                         device=CPU, progress=False)
    perms = res.permutations()
    assert perms  # the tiny model's Linears found orders that keep more than the stored one
    out = save_pruned(model, tokenizer, tmp_path / "c", {"pattern": "2:4"}, format="compressed", pattern=NM(2, 4),
                      perms=perms)
    assert_identical(model, llmprune.load(out))
