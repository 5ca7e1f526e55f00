"""Tiny models built in process from a config, a tiny tokenizer, and the local data directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
VOCAB = 384


def data_dir() -> Path:
    value = os.environ.get("LLMPRUNE_DATA_DIR") or REPO.parent / "shared" / "data"
    path = Path(value)
    assert (path / "wikitext2_raw" / "wiki.test.raw").is_file(), f"test data not found at {path}; set LLMPRUNE_DATA_DIR"
    return path


@pytest.fixture(scope="session")
def ddir() -> Path:
    return data_dir()


def tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=16)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=8, sliding_window=16,
                                   layer_types=["sliding_attention", "full_attention"])
    if arch == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=32)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=256)
    raise KeyError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3", "opt", "gpt2", "gpt_neox"]


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    cfg.num_hidden_layers = layers
    if arch == "gemma3":  # alternate sliding-window and full attention, as the real model does
        cfg.layer_types = (["sliding_attention", "full_attention"] * layers)[:layers]
    elif getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = cfg.layer_types[:1] * layers
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(ddir):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = (ddir / "wikitext2_raw" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()[:3000]
    tok.train_from_iterator(text, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def tiny_folder(tmp_path, tokenizer):
    """A saved tiny Llama with the tiny tokenizer: what `--model DIR` reads."""
    path = tmp_path / "tiny-llama"
    model = tiny_model("llama", layers=3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_tokens(n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, seqlen), generator=g)


def norms_of(values):
    """InputNorms whose sqrt(mean x^2) equals ``values`` (one token per unit)."""
    from llmprune.stats import InputNorms

    acc = InputNorms(len(values), torch.device("cpu"))
    acc.add(torch.tensor([values], dtype=torch.float32))
    return acc


def linear_weights(model):
    """Every prunable weight of the decoder blocks as [out, in] (cloned), named "<block>.<layer>", in pruning order."""
    from llmprune.models import find_decoder, prunable_layers, weight_matrix

    _, blocks = find_decoder(model)
    return {f"{i}.{n}": weight_matrix(m).clone() for i, b in enumerate(blocks) for n, m in prunable_layers(b).items()}


# ---------------------------------------------------------------- 2:4 inference on CPU: cuSPARSELt emulated


class EmulatedKernels:
    """cuSPARSELt semantics on CPU: compress keeps the matrix, mm returns (A @ B)^T row-major."""

    calls = 0
    algos = []
    found = 3  # the algorithm id the search picks
    compress = staticmethod(lambda w: w.clone())
    search = staticmethod(lambda packed, b: EmulatedKernels.found)

    @staticmethod
    def mm(packed, b, bias, algo):
        EmulatedKernels.calls += 1
        EmulatedKernels.algos.append(algo)
        y = (packed.float() @ b.float()).t().contiguous().to(b.dtype)
        return y if bias is None else y + bias


@pytest.fixture
def emulated(monkeypatch):
    from llmprune.inference import kernel

    for name in ("compress", "search", "mm"):
        monkeypatch.setattr(kernel.Kernels, name, getattr(EmulatedKernels, name))
    EmulatedKernels.calls = 0
    EmulatedKernels.algos = []
    EmulatedKernels.found = 3
    return EmulatedKernels


def pruned_24(arch: str = "llama"):
    """A tiny model pruned to 2:4 with Wanda on random tokens."""
    import llmprune

    model = tiny_model(arch)
    llmprune.prune(model, calib_tokens=random_tokens(4, 32), pattern="2:4", device=torch.device("cpu"), progress=False)
    return model


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 mask applied in place; returns the weight."""
    from llmprune.patterns import NM, select

    weight.mul_(select(weight.abs().float(), NM(2, 4)).to(weight.dtype))
    return weight
