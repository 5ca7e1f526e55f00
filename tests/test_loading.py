import hashlib
import sys

import pytest

from llmprune import UsageError, loading


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Two installed 'packages' each holding one part of a split GGUF file."""
    chunks = [b"GGUF" + b"a" * 1000, b"b" * 777]
    for i, chunk in enumerate(chunks):
        pkg = tmp_path / "site" / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / "f.part").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LLMPRUNE_CACHE", str(tmp_path / "cache"))
    whole = b"".join(chunks)
    entry = loading.PackagedGGUF((("fakepart0", "data/f.part"), ("fakepart1", "data/f.part")), "joined.gguf",
                                 "pip install fakeparts", hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(loading.ALIASES, "fake", entry)
    return whole


def test_split_gguf_is_joined_once(fake_parts, tmp_path):
    path = loading.alias_path("fake")
    assert path.read_bytes() == fake_parts
    mtime = path.stat().st_mtime_ns
    assert loading.alias_path("fake") == path and path.stat().st_mtime_ns == mtime  # reused, not rewritten
    assert [p.name for p in path.parent.iterdir()] == ["joined.gguf"]  # no temporary file left


def test_checksum_mismatch_leaves_nothing(fake_parts, tmp_path, monkeypatch):
    entry = loading.ALIASES["fake"]
    monkeypatch.setitem(loading.ALIASES, "fake", loading.PackagedGGUF(entry.parts, entry.filename, entry.install, "0" * 64))
    with pytest.raises(UsageError, match="do not match the expected checksum"):
        loading.alias_path("fake")
    assert list((tmp_path / "cache" / "gguf-src").iterdir()) == []


def test_missing_package_names_the_install(monkeypatch):
    monkeypatch.setitem(loading.ALIASES, "nope", loading.PackagedGGUF((("no_such_pkg_xyz", "f.gguf"),), "f.gguf",
                                                                      "pip install no-such-pkg"))
    with pytest.raises(UsageError, match="not installed; pip install no-such-pkg"):
        loading.alias_path("nope")


def test_hub_id_and_paths():
    assert loading.resolve_source("org/name") == ("hub", "org/name")
    with pytest.raises(UsageError, match="no such file or folder"):
        loading.resolve_source("./missing-folder")
    with pytest.raises(UsageError, match="no such GGUF file"):
        loading.resolve_source("missing.gguf")


def test_prefetch_asks_for_a_folders_weight_files_only(tmp_path):
    """The page-cache hint covers the weight files of a local folder, and nothing for a hub id or a GGUF file."""
    from llmprune.loading import prefetch

    (tmp_path / "model-00001.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / "model-00002.safetensors").write_bytes(b"\0" * 24)
    (tmp_path / "config.json").write_text("{}")
    assert prefetch(str(tmp_path)) == 1024
    assert prefetch("someone/some-model") == 0
    assert prefetch(str(tmp_path / "model-00001.safetensors")) == 0


class _Tokenizer:
    """A stand-in with a vocabulary of ``size`` that splits text into words or into characters."""

    def __init__(self, size: int, per_char: bool):
        self.size, self.per_char = size, per_char

    def __len__(self):
        return self.size

    def __call__(self, text, add_special_tokens=True):
        pieces = [c for c in text if not c.isspace()] if self.per_char else text.split()
        return {"input_ids": list(range(len(pieces)))}


def test_a_gguf_tokenizer_read_as_characters_is_refused():
    # transformers 5.17 turns Gemma 3's saved GGUF vocabulary into one token per character: 35 ids for 9 words
    with pytest.raises(UsageError, match=r"wrongly \(35 tokens for a 9-word English sentence, at most 18.*transformers"):
        loading.check_gguf_tokenizer(_Tokenizer(262144, per_char=True), "m.gguf")


def test_a_word_level_or_tiny_vocabulary_passes():
    loading.check_gguf_tokenizer(_Tokenizer(262144, per_char=False), "m.gguf")  # 9 tokens
    loading.check_gguf_tokenizer(_Tokenizer(7999, per_char=True), "m.gguf")  # a small vocabulary may split words


@pytest.mark.slow
def test_the_real_tokenizer_passes_the_check():
    tok = loading.load_model("smollm2-135m", progress=False)[1]
    loading.check_gguf_tokenizer(tok, "smollm2.gguf")
    assert len(tok(loading._SENTENCE, add_special_tokens=False)["input_ids"]) <= 12
