"""Swapping a model's 2:4 Linears for (fused) sparse cores and back: on CPU with cuSPARSELt emulated, on the
GPU behind the gpu marker; a --permute model's orders gathered at run time or folded into the producing Linears."""

import pytest
import torch
import torch.nn.functional as F

import llmprune
from llmprune import NM, UsageError, compressed
from llmprune.export import save_pruned
from llmprune.inference import kernel, swap
from llmprune.patterns import select

from .conftest import pruned_24, random_tokens, tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_swap_matches_dense_and_restores(emulated, arch):
    model = pruned_24(arch)
    ids = random_tokens(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        originals, plan = swap.sparsify(model, buckets=(32,), reps=1)
        plan.force = True
        emulated.calls = 0
        out = model(input_ids=ids).logits
    n_cores = len(swap.cores_of(model))
    # llama: qkv, o, gate+up, down; opt: qkv, out_proj, fc1, fc2 -> 4 cores in each of 2 blocks
    assert n_cores == 8
    assert emulated.calls == n_cores
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    swap.restore(originals)
    assert not swap.cores_of(model)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref)


def test_refuses_model_without_2to4_layers(emulated):
    with pytest.raises(UsageError, match="no 2:4 Linear"):
        swap.sparsify(tiny_model("llama"))


def permuted_24(arch: str = "llama"):
    """A tiny model pruned 2:4 by RIA on permuted input channels, and the orders of its Linears."""
    model = tiny_model(arch)
    res = llmprune.prune(model, calib_tokens=random_tokens(4, 32), method="ria", pattern="2:4", permute=True,
                         device=torch.device("cpu"), progress=False)
    return model, res.permutations()


CONSUMERS = {"llama": "mlp.down_proj", "opt": "fc2", "gemma3": "mlp.down_proj", "gpt_neox": "mlp.dense_4h_to_h"}


def test_fold_order_by_hand():
    """Permuting the consumer's input columns by p and the producers' output rows (and biases) by p leaves
    down(act(gate x) * up x) unchanged, and the consumer's weight comes out 2:4 as stored."""
    g = torch.Generator().manual_seed(0)
    gate, up, down = (torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g), torch.randn(4, 8, generator=g))
    bias = torch.randn(8, generator=g)
    p = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    down[:, p] = down[:, p] * select(down[:, p].abs(), NM(2, 4))  # 2:4 in the order p
    specs = [swap.LinearSpec(down, None, p), swap.LinearSpec(gate, bias), swap.LinearSpec(up, None, torch.arange(4))]
    consumer, (g2, u2) = swap.fold_order(specs[0], specs[1:])
    assert consumer.perm is None and consumer.is_24 and torch.equal(consumer.weight, down[:, p])
    assert torch.equal(g2.weight, gate[p]) and torch.equal(g2.bias, bias[p]) and torch.equal(u2.weight, up[p])
    assert torch.equal(u2.perm, torch.arange(4))  # a producer's own input order is kept
    x = torch.randn(5, 4, generator=g)
    ref = F.linear(F.silu(F.linear(x, gate, bias)) * F.linear(x, up), down)
    got = F.linear(F.silu(F.linear(x, g2.weight, g2.bias)) * F.linear(x, u2.weight), consumer.weight)
    torch.testing.assert_close(got, ref)


@pytest.mark.parametrize("fold", [True, False], ids=["folded", "gathered"])
@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3", "gpt_neox"])
def test_permuted_swap_matches_dense(emulated, arch, fold):
    """Every permuted Linear becomes a sparse core over W[:, perm]; the logits equal the dense pruned model's.
    Folded: the MLP's second Linear takes its order from the first's output rows and gathers nothing."""
    model, perms = permuted_24(arch)
    ids = random_tokens(2, 16)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        originals, plan = swap.sparsify(model, buckets=(32,), reps=1, perms=perms, fold=fold)
        plan.force = True
        emulated.calls = 0
        out = model(input_ids=ids).logits
    cores = swap.cores_of(model)
    assert len(cores) == len(perms) == emulated.calls  # no layer fused: each has its own order
    gathers = [c for c in cores if c.perm is not None]
    assert len(gathers) == len(perms) - (2 if fold else 0)  # one folded Linear in each of the 2 blocks
    consumers = [m for n, m in model.named_modules() if n.endswith(CONSUMERS[arch])]
    assert len(consumers) == 2 and all(isinstance(c, kernel.SparseCore) and (c.perm is None) == fold for c in consumers)
    assert any(row["gather"] for row in plan.timings)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    swap.restore(originals)
    assert not swap.cores_of(model)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())  # folding moved copies only
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_without_its_orders_a_permuted_model_keeps_its_linears(emulated):
    model, _ = permuted_24()
    with pytest.raises(UsageError, match="no 2:4 Linear"):  # none of its 14 Linears is 2:4 as stored
        swap.sparsify(model, buckets=(32,), reps=1)


def test_a_folded_order_keeps_gate_and_up_fused(emulated):
    """gate/up 2:4 as stored, down_proj 2:4 only in an order p: folded, gate/up stay one fused core (rows
    permuted) and down_proj gathers nothing; not folded, down_proj gathers."""
    for fold in (True, False):
        model = pruned_24()
        perms = {}
        with torch.no_grad():
            for i, block in enumerate(model.model.layers):
                w = block.mlp.down_proj.weight
                p = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(i))
                w[:, p] = w[:, p] * select(w[:, p].abs(), NM(2, 4))  # 2:4 in p (1 of 4 as stored, at most 2 in p)
                perms[f"model.layers.{i}.mlp.down_proj.weight"] = p  # weight names are taken too
            ids = random_tokens(2, 16)
            ref = model(input_ids=ids).logits
            _, plan = swap.sparsify(model, buckets=(32,), reps=1, perms=perms, fold=fold)
            plan.force = True
            out = model(input_ids=ids).logits
        mlp = model.model.layers[0].mlp
        assert isinstance(mlp.gate_proj, swap.FusedMember) and isinstance(mlp.down_proj, kernel.SparseCore)
        assert (mlp.down_proj.perm is None) == fold
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_orders_that_name_no_linear_or_the_wrong_columns_are_refused(emulated):
    model, perms = permuted_24()
    with pytest.raises(UsageError, match="'model.norm', which is not a Linear of the decoder blocks"):
        swap.sparsify(model, perms={**perms, "model.norm": torch.arange(32)})
    with pytest.raises(UsageError, match="'self_attn.rotary', which is not a Linear of this block"):
        swap.sparsify(model, perms={"model.layers.0.self_attn.rotary": torch.arange(32)})
    with pytest.raises(UsageError, match="the input permutation of mlp.down_proj is not an order of its 64 columns"):
        swap.sparsify(model, perms={"model.layers.0.mlp.down_proj": torch.arange(32)})


def test_a_compressed_permuted_folder_runs_on_the_sparse_path(emulated, tmp_path):
    """What a user does: load the compressed folder, take its orders, swap; the logits equal the pruned model's."""
    model, perms = permuted_24()
    out = save_pruned(model, None, tmp_path / "c", {}, format="compressed", pattern=NM(2, 4), perms=perms)
    loaded = llmprune.load(out)
    loaded.set_attn_implementation("eager")  # as the tiny model runs
    ids = random_tokens(2, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        _, plan = swap.sparsify(loaded, buckets=(32,), reps=1, perms=compressed.permutations(out))
        plan.force = True
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)
    assert len(swap.cores_of(loaded)) == 14


@pytest.mark.gpu
@cuda
def test_gpu_model_matches_dense():
    model = pruned_24().to("cuda", torch.bfloat16)
    cfg = model.config
    ids = random_tokens(2, 40).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        _, plan = swap.sparsify(model, reps=1)
        plan.force = True
        out = model(input_ids=ids).logits.float()
    assert cfg.vocab_size == out.shape[-1]
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("fold", [True, False], ids=["folded", "gathered"])
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_gpu_permuted_model_matches_dense(arch, fold):
    model, perms = permuted_24(arch)
    model = model.to("cuda", torch.bfloat16)
    ids = random_tokens(2, 40).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits.float()
        _, plan = swap.sparsify(model, reps=1, perms=perms, fold=fold)
        plan.force = True
        out = model(input_ids=ids).logits.float()
    assert sum(c.perm is not None for c in swap.cores_of(model)) == len(perms) - (2 if fold else 0)
    torch.testing.assert_close(out, ref, rtol=5e-2, atol=5e-2)
