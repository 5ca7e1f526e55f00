"""Memory estimate arithmetic and the placement decision, by hand, on CPU."""

import pytest
import torch

from llmprune import UsageError
from llmprune.memory import GiB, ModelSizes, estimate, plan

from .conftest import tiny_model

GPU = torch.device("cuda", 0)  # only a label here: nothing is allocated
SIZES = ModelSizes(hidden=100, widest=400, elem=2, block_bytes=10_000, stem_bytes=3_000, on_device_bytes=0,
                   hessian_sizes=(100, 400), largest_weight=(100, 400))


def test_wanda_estimate_by_hand():
    est = estimate(SIZES, nsamples=10, seqlen=8, batch_size=2, needs=("norms",), device=GPU, offload=False)
    acts = 10 * 8 * 100 * 2  # 16_000
    work = 16 * (3 * 400 * 2 + 6 * 100 * 2) + 16 * 400 * 8  # 16 tokens per batch: 57_600 + 51_200
    assert est.parts == {"model": 0, "block": 10_000, "activations": acts, "batch": work, "statistics": 0}
    assert est.device_bytes == 10_000 + acts + work  # the block phase is larger than capture (3_000 + acts + 12_800)
    assert est.cpu_bytes == 0 and not est.offload


def test_offload_moves_activations_to_cpu():
    est = estimate(SIZES, 10, 8, 2, ("norms",), GPU, offload=True)
    assert est.offload and est.cpu_bytes == 16_000
    assert est.device_bytes == 10_000 + 108_800


def test_hessian_statistics_by_hand():
    est = estimate(SIZES, 10, 8, 2, ("hessian",), GPU, offload=False)
    stats = 8 * (100**2 + 400**2) + 4 * 400**2
    prune_work = 8 * 100 * 400 + 12 * 400**2 + 12 * (1 << 25)
    assert est.parts["statistics"] == stats + prune_work


def test_plan_keeps_activations_on_the_gpu_when_they_fit_else_offloads_else_refuses():
    on_gpu = estimate(SIZES, 10, 8, 2, ("norms",), GPU, offload=False).device_bytes
    assert not plan(SIZES, 10, 8, 2, ("norms",), GPU, "auto", on_gpu, None).offload
    assert plan(SIZES, 10, 8, 2, ("norms",), GPU, "auto", on_gpu - 1, None).offload
    with pytest.raises(UsageError, match=r"--activations cpu"):
        plan(SIZES, 10, 8, 2, ("norms",), GPU, "gpu", on_gpu - 1, None)
    with pytest.raises(UsageError, match=r"--batch-size 1"):  # only a smaller batch fits
        plan(SIZES, 10, 8, 2, ("norms",), GPU, "cpu", 10_000 + 8 * (3 * 400 * 2 + 6 * 100 * 2) + 8 * 400 * 8, None)
    with pytest.raises(UsageError, match="use a larger device"):
        plan(SIZES, 10, 8, 2, ("norms",), GPU, "auto", 5_000, None)


def test_plan_refuses_when_offloaded_activations_exceed_cpu_memory():
    with pytest.raises(UsageError, match="more CPU memory"):
        plan(SIZES, 10, 8, 2, ("norms",), GPU, "cpu", None, 15_999)


def test_parameters_already_on_the_device_are_not_counted_against_free_memory():
    resident = ModelSizes(**{**SIZES.__dict__, "on_device_bytes": 1_000_000})
    est = estimate(resident, 10, 8, 2, ("norms",), GPU, offload=False)
    assert est.device_bytes == 1_000_000 + 16_000 + 108_800  # block already counted in the model
    assert not plan(resident, 10, 8, 2, ("norms",), GPU, "auto", 124_800, None).offload


def test_sizes_read_off_a_tiny_llama():
    model = tiny_model("llama", layers=2)  # hidden 32, intermediate 64, 4 heads of 8, 2 kv heads, fp32
    sizes = ModelSizes.of(model, torch.device("cpu"))
    assert (sizes.hidden, sizes.widest, sizes.elem) == (32, 64, 4)
    assert sizes.hessian_sizes == (32, 32, 32, 64)  # q/k/v, o, gate/up, down
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    assert sizes.block_bytes == block and sizes.on_device_bytes == 0
    assert sizes.eager_attention_heads == 4
    assert "GiB" in estimate(sizes, 4, 16, 2, ("norms",), torch.device("cpu"), False).describe(torch.device("cpu"))
    assert GiB == 2**30


def test_whole_model_on_the_gpu_only_when_model_and_run_fit_beside_each_other():
    from llmprune.memory import whole_model_fits

    model = tiny_model("llama", layers=2)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    sizes = ModelSizes.of(model, GPU, whole_model_on_device=True)
    assert sizes.on_device_bytes == model_bytes and ModelSizes.of(model, GPU).on_device_bytes == 0
    need = estimate(sizes, 4, 16, 2, ("norms",), GPU, offload=False).device_bytes
    assert need > model_bytes
    assert whole_model_fits(model, 4, 16, 2, ("norms",), GPU, "auto", need, None)
    assert not whole_model_fits(model, 4, 16, 2, ("norms",), GPU, "auto", need - 1, None)
    assert not whole_model_fits(model, 4, 16, 2, ("norms",), torch.device("cpu"), "auto", None, None)


def test_cpu_estimate_carries_the_measured_heap_margin():
    from llmprune.memory import CPU_HEAP_MARGIN

    cpu = torch.device("cpu")
    est = estimate(SIZES, nsamples=10, seqlen=8, batch_size=2, needs=("norms",), device=cpu, offload=False)
    acts, work = 10 * 8 * 100 * 2, 16 * (3 * 400 * 2 + 6 * 100 * 2) + 16 * 400 * 8
    assert est.device_bytes == 0 and est.cpu_bytes == int(CPU_HEAP_MARGIN * (acts + work))  # no block: it is in memory
