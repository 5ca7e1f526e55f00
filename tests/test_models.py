"""Where architectures differ (models.py): the block list of each supported family, the Linears of a block by
hand, GPT-2's transposed Conv1D, context length and BOS, and the refusals."""

import pytest
import torch
from torch import nn

import llmprune
from llmprune import UsageError
from llmprune.models import (context_length, find_decoder, needs_bos, prunable_layers, set_weight_matrix,
                             weight_matrix)

from .conftest import ARCHS, tiny_model

CPU = torch.device("cpu")

# where the decoder and its block list live, from the causal-LM wrapper
DECODER_PATHS = {"llama": "model", "mistral": "model", "qwen2": "model", "qwen3": "model", "gemma3": "model",
                 "opt": "model.decoder", "gpt2": "transformer", "gpt_neox": "gpt_neox"}
BLOCK_LISTS = {"opt": "layers", "gpt2": "h", "gpt_neox": "layers"}


def attribute(obj, path):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.mark.parametrize("arch", ARCHS)
def test_find_decoder_finds_each_familys_block_list(arch):
    assert sorted(DECODER_PATHS) == sorted(ARCHS)
    model = tiny_model(arch, layers=3)
    decoder, blocks = find_decoder(model)
    assert decoder is attribute(model, DECODER_PATHS[arch])
    assert blocks is getattr(decoder, BLOCK_LISTS.get(arch, "layers")) and len(blocks) == 3


def test_llama_block_linears_by_hand():
    # hidden 32, 4 heads of 8, 2 key/value heads (16 wide), MLP 64; in definition order
    block = find_decoder(tiny_model("llama"))[1][0]
    shapes = {name: tuple(weight_matrix(layer).shape) for name, layer in prunable_layers(block).items()}
    assert list(shapes.items()) == [
        ("self_attn.q_proj", (32, 32)), ("self_attn.k_proj", (16, 32)), ("self_attn.v_proj", (16, 32)),
        ("self_attn.o_proj", (32, 32)), ("mlp.gate_proj", (64, 32)), ("mlp.up_proj", (64, 32)),
        ("mlp.down_proj", (32, 64))]


@torch.no_grad()
def test_gpt2_conv1d_weight_is_seen_as_out_by_in_and_written_through():
    block = find_decoder(tiny_model("gpt2"))[1][0]
    layers = prunable_layers(block)
    assert list(layers) == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    c_attn = layers["attn.c_attn"]
    assert tuple(c_attn.weight.shape) == (32, 96) and tuple(weight_matrix(c_attn).shape) == (96, 32)
    x = torch.randn(5, 32)
    # second path: the module's own forward is x W_stored + b, i.e. x (weight_matrix)^T + b
    assert torch.allclose(c_attn(x), x @ weight_matrix(c_attn).T + c_attn.bias, atol=1e-6)
    new = torch.arange(96 * 32, dtype=torch.float32).reshape(96, 32)
    set_weight_matrix(c_attn, new)
    assert torch.equal(c_attn.weight, new.T)


def test_context_length_and_bos():
    assert context_length(tiny_model("llama")) == 256  # max_position_embeddings
    assert context_length(tiny_model("gpt2")) == 256  # n_positions
    assert context_length(nn.Linear(2, 2)) is None
    assert needs_bos(tiny_model("gemma3")) and not needs_bos(tiny_model("llama"))


def test_block_without_linears_is_refused():
    with pytest.raises(UsageError, match="block Sequential has no Linear layers to prune"):
        prunable_layers(nn.Sequential(nn.ReLU()))


def test_unsupported_architecture():
    class NotAnLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(4, 4)

    with pytest.raises(UsageError, match="unsupported architecture NotAnLM"):
        llmprune.prune(NotAnLM(), method="magnitude", device=CPU, progress=False)
