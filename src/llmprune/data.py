"""Calibration windows and evaluation token streams, from a local data directory or the hub.

The data directory (``--data-dir`` or ``LLMPRUNE_DATA_DIR``) mirrors the public files:
``wikitext2_raw/wiki.test.raw``, ``c4/c4_sample.jsonl``, ``ptb/ptb.test.txt``. Without it the
standard Hugging Face datasets are used (needs ``pip install datasets`` and a network).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch

from .errors import UsageError

EVAL_SETS = ("wikitext2", "ptb", "c4")
CALIB_SETS = ("c4", "wikitext2")
ENV_DATA_DIR = "LLMPRUNE_DATA_DIR"
C4_EVAL_DOCS = 1100  # documents of the C4 validation shard joined for perplexity (SparseGPT/Wanda)
C4_EVAL_WINDOWS = 256  # windows of C4 validation text evaluated (SparseGPT/Wanda)


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    value = explicit or os.environ.get(ENV_DATA_DIR)
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        flag = "--data-dir" if explicit else ENV_DATA_DIR
        raise UsageError(f"{flag} {value} is not a directory; point it at the folder holding wikitext2_raw/, c4/, ptb/")
    return path


def _local(ddir: Path | None, relative: str) -> Path | None:
    if ddir is not None and (ddir / relative).is_file():
        return ddir / relative
    return None


def _hub(*args, what: str, local_hint: str, **kwargs):
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"{what}: no local file ({local_hint} under --data-dir / {ENV_DATA_DIR}) and the `datasets` "
            "package is not installed; set --data-dir or pip install datasets"
        ) from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # network, hub or format failure: say what was tried
        raise UsageError(
            f"{what}: no local file ({local_hint} under --data-dir / {ENV_DATA_DIR}) and the hub failed "
            f"({type(exc).__name__}); set --data-dir to a folder holding {local_hint}"
        ) from None


def _wikitext_rows(ddir: Path | None, split: str) -> list[str]:
    name = {"test": "wiki.test.raw", "train": "wiki.train.raw", "validation": "wiki.valid.raw"}[split]
    path = _local(ddir, f"wikitext2_raw/{name}")
    if path is not None:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
        return [line if line.strip() else "" for line in lines]  # the HF datasets rows
    ds = _hub("wikitext", "wikitext-2-raw-v1", split=split, what=f"wikitext2 {split}", local_hint=f"wikitext2_raw/{name}")
    return list(ds["text"])


def _read_jsonl_texts(path: Path, field: str = "text") -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"--calib {path}: line {lineno} is not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise UsageError(f"--calib {path}: line {lineno} has no string '{field}' field; each line needs {{\"{field}\": ...}}")
            texts.append(record[field])
    return texts


# split -> (file under the data directory, file of the allenai/c4 hub dataset)
_C4_FILES = {
    "train": ("c4/c4_sample.jsonl", "en/c4-train.00000-of-01024.json.gz"),
    "validation": ("c4/c4_validation.jsonl", "en/c4-validation.00000-of-00008.json.gz"),
}


def _c4_documents(ddir: Path | None, split: str) -> list[str]:
    local, remote = _C4_FILES[split]
    path = _local(ddir, local)
    if path is not None:
        return _read_jsonl_texts(path)
    ds = _hub("allenai/c4", data_files={split: remote}, split=split, what=f"c4 {split}", local_hint=local)
    return list(ds["text"])


def _ptb_sentences(ddir: Path | None) -> list[str]:
    path = _local(ddir, "ptb/ptb.test.txt")
    if path is not None:
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    ds = _hub("ptb_text_only", "penn_treebank", split="test", what="--eval ptb", local_hint="ptb/ptb.test.txt")
    return list(ds["sentence"])


def _encode(tokenizer, text: str) -> torch.Tensor:
    # the tokenizer's defaults, as the reference evaluation code calls it (a Llama tokenizer adds one BOS)
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_tokens(tokenizer, name: str, seqlen: int, ddir: Path | None = None) -> torch.Tensor:
    """The token stream of an evaluation set, built as in the Wanda/SparseGPT evaluation code."""
    if name == "wikitext2":
        return _encode(tokenizer, "\n\n".join(_wikitext_rows(ddir, "test")))
    if name == "ptb":
        return _encode(tokenizer, " ".join(_ptb_sentences(ddir)))
    if name == "c4":
        docs = _c4_documents(ddir, "validation")[:C4_EVAL_DOCS]
        return _encode(tokenizer, " ".join(docs))[: C4_EVAL_WINDOWS * seqlen]
    raise UsageError(f"--eval: unknown set {name!r}; choose from {', '.join(EVAL_SETS)}")


def _sample_documents(docs: list[torch.Tensor], nsamples: int, seqlen: int, seed: int, label: str) -> torch.Tensor:
    """Wanda's C4 sampler: a random document longer than seqlen, then a random window in it."""
    long_enough = sum(1 for d in docs if d.numel() > seqlen)
    if long_enough == 0:
        raise UsageError(
            f"--calib {label}: no document is longer than --seqlen {seqlen} tokens "
            f"(longest has {max((d.numel() for d in docs), default=0)}); lower --seqlen or use a text with longer documents"
        )
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        while True:
            doc = docs[rng.randint(0, len(docs) - 1)]
            if doc.numel() > seqlen:
                break
        start = rng.randint(0, doc.numel() - seqlen - 1)
        out.append(doc[start : start + seqlen])
    return torch.stack(out)


def _sample_stream(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, label: str) -> torch.Tensor:
    """SparseGPT's WikiText-2 sampler: random windows of one long token stream."""
    if stream.numel() <= seqlen:
        raise UsageError(f"--calib {label}: {stream.numel()} tokens, fewer than --seqlen {seqlen}; lower --seqlen")
    rng = random.Random(seed)
    starts = [rng.randint(0, stream.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([stream[s : s + seqlen] for s in starts])


def _file_windows(stream: torch.Tensor, nsamples: int, seqlen: int, seed: int, label: str) -> torch.Tensor:
    """A user's text file: ``nsamples`` distinct non-overlapping windows, chosen at random."""
    available = stream.numel() // seqlen
    if available < nsamples:
        raise UsageError(
            f"--calib {label}: {stream.numel()} tokens make only {available} windows of --seqlen {seqlen}, "
            f"fewer than --nsamples {nsamples}; use a longer text, or lower --nsamples or --seqlen"
        )
    chosen = sorted(random.Random(seed).sample(range(available), nsamples))
    return torch.stack([stream[i * seqlen : (i + 1) * seqlen] for i in chosen])


def _read_text_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"--calib {path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if not text.strip():
        raise UsageError(f"--calib {path}: the file is empty; give a text with at least --nsamples x --seqlen tokens")
    return text


def _calibration_texts(path: Path) -> list[str]:
    """The documents of a calibration file (.jsonl: the ``text`` field of each line; else the whole text)."""
    if path.suffix != ".jsonl":
        return [_read_text_file(path)]
    try:
        texts = _read_jsonl_texts(path)
    except UnicodeDecodeError as exc:
        raise UsageError(f"--calib {path}: not UTF-8 text (byte {exc.start}); convert it to UTF-8") from None
    if not texts:
        raise UsageError(f"--calib {path}: the file has no documents")
    return texts


def _calibration_path(source: str) -> Path:
    path = Path(source)
    if not path.is_file():
        raise UsageError(f"--calib must be {' or '.join(CALIB_SETS)} or a path to a .txt/.jsonl file; {source!r} is neither")
    return path


def check_calibration_source(source: str) -> None:
    """Read and check a calibration file before any model is loaded (a bad file then costs no loading)."""
    if source not in CALIB_SETS:
        _calibration_texts(_calibration_path(source))


def calibration_tokens(tokenizer, source: str, nsamples: int, seqlen: int, seed: int, ddir: Path | None = None) -> torch.Tensor:
    """Calibration windows ``[nsamples, seqlen]`` of token ids."""
    if source == "c4":
        docs = [_encode(tokenizer, t) for t in _c4_documents(ddir, "train")]
        return _sample_documents(docs, nsamples, seqlen, seed, "c4")
    if source == "wikitext2":
        rows = _wikitext_rows(ddir, "train")
        return _sample_stream(_encode(tokenizer, " ".join(rows)), nsamples, seqlen, seed, "wikitext2")
    path = _calibration_path(source)
    texts = _calibration_texts(path)
    if path.suffix == ".jsonl":
        return _sample_documents([_encode(tokenizer, t) for t in texts], nsamples, seqlen, seed, str(path))
    return _file_windows(_encode(tokenizer, texts[0]), nsamples, seqlen, seed, str(path))


def _read_token_array(path: Path) -> np.ndarray:
    if path.suffix == ".pt":  # a torch file: tensors only, never arbitrary pickled objects
        import pickle

        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as exc:
            raise UsageError(f"--calib-tokens {path}: cannot read it as a plain tensor file, and other pickled "
                             f"objects are never loaded ({str(exc).splitlines()[0][:120]}); save a tensor or a .npy array") from None
        if not isinstance(value, torch.Tensor):
            raise UsageError(f"--calib-tokens {path}: holds a {type(value).__name__}, not a tensor; save one tensor [nsamples, seqlen]")
        return value.numpy()
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--calib-tokens {path}: cannot read it as a .npy array ({exc})") from None


def load_token_file(path: str | os.PathLike, vocab_size: int | None) -> torch.Tensor:
    """``--calib-tokens FILE.npy`` (or a ``.pt`` tensor, read with ``weights_only``): ints [nsamples, seqlen], used exactly."""
    array = _read_token_array(Path(path))
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer) or array.size == 0:
        raise UsageError(f"--calib-tokens {path}: need a non-empty integer array [nsamples, seqlen], got {array.dtype} {array.shape}")
    if array.min() < 0 or (vocab_size is not None and array.max() >= vocab_size):
        raise UsageError(f"--calib-tokens {path}: token ids must lie in [0, {vocab_size}), got [{array.min()}, {array.max()}]")
    return torch.from_numpy(array.astype(np.int64))
