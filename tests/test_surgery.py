"""Module surgery on tiny models: exact shapes and parameter counts, whole KV groups, exact outputs, configs."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmprune import UsageError, surgery
from llmprune.models import find_decoder

from .conftest import tiny_model


def test_shape_and_unit_costs_of_a_tiny_llama():
    model = tiny_model("llama", layers=2)  # hidden 32, intermediate 64, 4 heads of 8, 2 KV heads, no biases
    shape = surgery.shape_of(model)
    assert (shape.hidden, shape.intermediate, shape.heads, shape.kv_heads, shape.head_dim, shape.layers) == \
        (32, 64, 4, 2, 8, 2)
    assert shape.channel_params == 3 * 32
    assert shape.group_params == 16 * 32 + 8 * 32 + 8 * 32 + 32 * 16  # q rows, k rows, v rows, o columns
    assert shape.block_params == 64 * 32 * 3 + (32 * 32 * 2 + 16 * 32 * 2) + 2 * 32  # + two norms
    qwen = surgery.shape_of(tiny_model("qwen2"))  # q/k/v carry biases: one more parameter per row
    assert qwen.group_params == 16 * 33 + 8 * 33 + 8 * 33 + 32 * 16


def test_keep_kv_groups_removes_whole_groups_with_their_query_heads():
    model = tiny_model("llama", layers=1)
    block = find_decoder(model)[1][0]
    attn = block.self_attn
    q, k, v, o = (getattr(attn, n).weight.clone() for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    shape = surgery.shape_of(model)
    surgery.keep_kv_groups(block, torch.tensor([1]), shape)
    # group 1 = query heads 2 and 3 (rows 16..31 of q), KV head 1 (rows 8..15 of k and v), o_proj columns 16..31
    assert torch.equal(attn.q_proj.weight, q[16:32]) and torch.equal(attn.o_proj.weight, o[:, 16:32])
    assert torch.equal(attn.k_proj.weight, k[8:16]) and torch.equal(attn.v_proj.weight, v[8:16])


def test_zero_importance_channel_removed_leaves_outputs_exactly_equal():
    model = tiny_model("llama", layers=2)
    blocks = find_decoder(model)[1]
    with torch.no_grad():
        for block in blocks:
            block.mlp.down_proj.weight[:, [3, 10]] = 0.0  # these channels contribute nothing
            block.self_attn.o_proj.weight[:, 16:32] = 0.0  # nor does KV group 1
    ids = torch.randint(0, 300, (2, 12))
    before = model(ids).logits
    shape = surgery.shape_of(model)
    kept = torch.tensor([i for i in range(64) if i not in (3, 10)])
    for block in blocks:
        surgery.keep_mlp_channels(block, kept)
        surgery.keep_kv_groups(block, torch.tensor([0]), shape)
    surgery.write_config(model, 62, 1, shape)
    # equal up to the order of the matmul's sums (the inner dimension changed); exactly equal below on integers
    assert torch.allclose(model(ids).logits, before, rtol=0, atol=1e-6)


def test_zero_column_removed_is_bit_exact_on_integer_data():
    mlp = tiny_model("llama", layers=1).model.layers[0].mlp
    with torch.no_grad():
        for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            linear.weight.copy_(torch.randint(-3, 4, linear.weight.shape).float())
        mlp.down_proj.weight[:, 5] = 0.0
    mlp.act_fn = torch.nn.ReLU()  # integer in, integer out: every sum is exact whatever its order
    x = torch.randint(-2, 3, (4, 32)).float()
    before = mlp(x)
    block = type("Block", (torch.nn.Module,), {})()
    block.self_attn, block.mlp = torch.nn.Module(), mlp
    surgery.keep_mlp_channels(block, torch.tensor([i for i in range(64) if i != 5]))
    assert mlp.down_proj.in_features == 63 and torch.equal(mlp(x), before)


def test_drop_blocks_renumbers_layers_and_keeps_layer_types():
    model = tiny_model("gemma3", layers=4)  # sliding, full, sliding, full
    surgery.drop_blocks(model, [0, 3])
    blocks = find_decoder(model)[1]
    assert len(blocks) == 2 and model.config.num_hidden_layers == 2
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert [b.self_attn.layer_idx for b in blocks] == [0, 1]
    ids = torch.randint(0, 300, (1, 8))
    out = model.generate(ids, max_new_tokens=3, do_sample=False)  # the KV cache follows the new indices
    assert out.shape == (1, 11)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_added_bias_sets_the_config_flag_and_reloads(arch, tmp_path):
    model = tiny_model(arch, layers=2)
    shape = surgery.shape_of(model)
    for block in find_decoder(model)[1]:
        surgery.keep_kv_groups(block, torch.tensor([0]), shape, o_bias=torch.full((32,), 0.5))
    surgery.write_config(model, 64, 1, shape, biased=("heads",))
    assert model.config.attention_bias is True and model.config.num_attention_heads == 2
    assert torch.equal(find_decoder(model)[1][0].self_attn.q_proj.bias, torch.zeros(16))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 300, (2, 10))
    assert torch.equal(again(ids).logits, model(ids).logits)


def test_bias_flags_and_unsupported_architectures():
    assert surgery.bias_flag(tiny_model("llama"), "mlp") == "mlp_bias"
    assert surgery.bias_flag(tiny_model("gemma3"), "mlp") is None
    assert surgery.bias_flag(tiny_model("mistral"), "heads") is None
    with pytest.raises(UsageError, match="--structure: structured pruning supports .*OPTForCausalLM"):
        surgery.check_supported(tiny_model("opt"))
