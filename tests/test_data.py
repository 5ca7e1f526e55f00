import json

import numpy as np
import pytest
import torch

from llmprune import UsageError, data


def test_wikitext_rows_match_the_hf_split(ddir):
    rows = data._wikitext_rows(ddir, "test")
    assert len(rows) == 4358  # HF wikitext-2-raw-v1 test rows
    assert sum(len(r.encode()) for r in rows) == 1_287_656  # see the data folder's SOURCE.md
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"


def test_ptb_sentences(ddir):
    sentences = data._ptb_sentences(ddir)
    assert len(sentences) == 3761
    assert all(s == s.strip() for s in sentences)


def test_c4_calibration_is_seeded_and_shaped(ddir, tokenizer):
    a = data.calibration_tokens(tokenizer, "c4", 6, 64, seed=0, ddir=ddir)
    b = data.calibration_tokens(tokenizer, "c4", 6, 64, seed=0, ddir=ddir)
    c = data.calibration_tokens(tokenizer, "c4", 6, 64, seed=1, ddir=ddir)
    assert a.shape == (6, 64) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_document_sampler_follows_the_reference_random_stream():
    """Wanda's loader: randint over documents until one is longer than seqlen, then randint for the start."""
    import random

    docs = [torch.arange(100 * i, 100 * i + n) for i, n in enumerate([5, 50, 3, 40])]
    got = data._sample_documents(docs, 3, 10, seed=7, label="x")
    rng = random.Random(7)
    expected = []
    for _ in range(3):
        while True:
            d = docs[rng.randint(0, 3)]
            if d.numel() > 10:
                break
        s = rng.randint(0, d.numel() - 10 - 1)
        expected.append(d[s : s + 10])
    assert torch.equal(got, torch.stack(expected))


def test_text_file_windows(tmp_path, tokenizer, ddir):
    path = tmp_path / "calib.txt"
    path.write_text((ddir / "wikitext2_raw" / "wiki.test.raw").read_text(encoding="utf-8")[:20000], encoding="utf-8")
    toks = data.calibration_tokens(tokenizer, str(path), 4, 32, seed=0)
    assert toks.shape == (4, 32)
    with pytest.raises(UsageError, match=r"make only \d+ windows of --seqlen 2048, fewer than --nsamples 100"):
        data.calibration_tokens(tokenizer, str(path), 100, 2048, seed=0)


def test_jsonl_file(tmp_path, tokenizer):
    path = tmp_path / "calib.jsonl"
    path.write_text("\n".join(json.dumps({"text": "word " * 80}) for _ in range(3)), encoding="utf-8")
    assert data.calibration_tokens(tokenizer, str(path), 2, 16, seed=0).shape == (2, 16)
    path.write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(UsageError, match="line 1 has no string 'text' field"):
        data.calibration_tokens(tokenizer, str(path), 2, 16, seed=0)
    with pytest.raises(UsageError, match="no document is longer than --seqlen 4096"):
        path.write_text(json.dumps({"text": "short"}) + "\n", encoding="utf-8")
        data.calibration_tokens(tokenizer, str(path), 2, 4096, seed=0)


def test_bad_calibration_files(tmp_path, tokenizer):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(UsageError, match="the file is empty"):
        data.calibration_tokens(tokenizer, str(empty), 2, 16, seed=0)
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(UsageError, match="not UTF-8"):
        data.calibration_tokens(tokenizer, str(binary), 2, 16, seed=0)
    with pytest.raises(UsageError, match="--calib must be c4 or wikitext2 or a path"):
        data.calibration_tokens(tokenizer, str(tmp_path / "missing.txt"), 2, 16, seed=0)


def test_wikitext2_calibration_needs_the_train_split(ddir, tokenizer):
    # the local folder holds only the test split; calibrating on it would leak the evaluation text
    with pytest.raises(UsageError, match="wikitext2_raw/wiki.train.raw"):
        data.calibration_tokens(tokenizer, "wikitext2", 2, 16, seed=0, ddir=ddir)


def test_token_file(tmp_path):
    good = tmp_path / "t.npy"
    np.save(good, np.arange(12, dtype=np.int32).reshape(3, 4))
    assert data.load_token_file(good, 100).shape == (3, 4)
    bad = tmp_path / "f.npy"
    np.save(bad, np.zeros((3, 4), dtype=np.float32))
    with pytest.raises(UsageError, match="integer array"):
        data.load_token_file(bad, 100)
    with pytest.raises(UsageError, match=r"token ids must lie in \[0, 5\)"):
        data.load_token_file(good, 5)


def test_eval_sets(ddir, tokenizer):
    with pytest.raises(UsageError, match="unknown set 'wiki'"):
        data.eval_tokens(tokenizer, "wiki", 128, ddir)
    stream = data.eval_tokens(tokenizer, "wikitext2", 128, ddir)
    assert stream.ndim == 1 and stream.numel() > 100_000


def test_data_dir_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_DATA_DIR, str(tmp_path))
    assert data.data_dir() == tmp_path
    with pytest.raises(UsageError, match="--data-dir"):
        data.data_dir(tmp_path / "nope")
