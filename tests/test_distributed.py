"""Two gloo processes on CPU prune a tiny model exactly as one process does with the same tokens."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

import llmprune
from llmprune import NM, Unstructured, UsageError, distributed

from .conftest import linear_weights, random_tokens, tiny_model

CPU = torch.device("cpu")
CASES = [("wanda", Unstructured(0.5), {}), ("sparsegpt", NM(2, 4), {}),
         ("wanda+dsnot", Unstructured(0.7), {"refine": llmprune.DSnoT(threshold=0.0)})]  # input means summed too


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prune_all(world, tokens):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same GEMM blocking in every process
    try:
        out = {}
        for method, pattern, options in CASES:
            model = tiny_model("llama", layers=2)
            llmprune.prune(model, calib_tokens=tokens, method=method.split("+")[0], pattern=pattern, device=CPU,
                           batch_size=2, progress=False, world=world, **options)
            out[method] = linear_weights(model)
        return out
    finally:
        torch.set_num_threads(threads)  # later tests in this process keep their BLAS rounding


def _rank(rank, size, port, tokens, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        results[rank] = _prune_all(distributed.World(rank, size, rank), tokens)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_single_process_result():
    tokens = random_tokens(7, 24)  # 4 batches of 2 (the last one short), split 2 + 2
    single = _prune_all(distributed.World(), tokens)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(2, _free_port(), tokens, results), nprocs=2, join=True)
        ranks = [results[0], results[1]]
    for method, _, _ in CASES:
        for name, w in single[method].items():
            for r in ranks:
                assert torch.equal(r[method][name] == 0, w == 0), (method, name)
                assert torch.allclose(r[method][name], w, atol=1e-6, rtol=1e-5), (method, name)


def test_shards_are_whole_batches_in_order():
    tokens = torch.arange(11).unsqueeze(1)
    parts = [distributed.shard(tokens, 2, distributed.World(r, 3)).flatten().tolist() for r in range(3)]
    assert parts == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    with pytest.raises(UsageError, match="--batch-size"):
        distributed.shard(tokens[:4], 2, distributed.World(0, 3))


LLAMA_7B = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
            "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
INPUTS = {"q_proj": "q_proj", "k_proj": "q_proj", "v_proj": "q_proj", "o_proj": "o_proj", "gate_proj": "gate_proj",
          "up_proj": "gate_proj", "down_proj": "down_proj"}


def test_layer_owners_by_hand():
    # SparseGPT on 2 ranks: down_proj (4096 x 11008^2 + 11008^3 / 3 = 9.41e11) outweighs the other six together
    # (7.13e11, q/k/v and gate/up each factorising their input once), so it is alone
    owners = distributed.layer_owners(LLAMA_7B, INPUTS, ("hessian",), 2)
    assert owners == {"down_proj": 0, "gate_proj": 1, "up_proj": 1, "q_proj": 1, "k_proj": 1, "v_proj": 1, "o_proj": 1}
    # 3 ranks: then gate_proj and up_proj (1.85e11 each + 2.3e10 for their input) go to the two emptier ranks
    owners = distributed.layer_owners(LLAMA_7B, INPUTS, ("hessian",), 3)
    assert owners["down_proj"] == 0 and {owners["gate_proj"], owners["up_proj"]} == {1, 2}
    # a score method: cost rows x cols, so the three 4096 x 11008-sized Linears spread first
    owners = distributed.layer_owners(LLAMA_7B, INPUTS, ("norms",), 3)
    assert sorted(owners[n] for n in ("down_proj", "gate_proj", "up_proj")) == [0, 1, 2]
    assert distributed.layer_owners(LLAMA_7B, INPUTS, ("hessian",), 1) == dict.fromkeys(LLAMA_7B, 0)


def _split_and_replicated(rank, size, port, tokens, results):
    """One process of K: the run with the Linears split over ranks, and the same run with every rank pruning all."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    torch.set_num_threads(1)
    try:
        world, out = distributed.World(rank, size, rank), {}
        for label, share in (("split", distributed.layer_share), ("replicated", lambda world: None)):
            distributed.layer_share, original = share, distributed.layer_share
            try:
                for method, pattern in (("sparsegpt", NM(2, 4)), ("alps", Unstructured(0.6)), ("wanda", NM(2, 4))):
                    model = tiny_model("llama", layers=2)
                    llmprune.prune(model, calib_tokens=tokens, method=method, pattern=pattern, device=CPU,
                                   batch_size=2, progress=False, world=world)
                    out[(label, method)] = linear_weights(model)
            finally:
                distributed.layer_share = original
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_three_processes_split_the_linears_and_equal_every_rank_pruning_all():
    tokens = random_tokens(6, 24)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_split_and_replicated, args=(3, _free_port(), tokens, results), nprocs=3, join=True)
        ranks = [results[r] for r in range(3)]
    for method in ("sparsegpt", "alps", "wanda"):
        reference = ranks[0][("replicated", method)]
        for r in ranks:
            for name, w in reference.items():
                assert torch.equal(r[("split", method)][name], w), (method, name)  # bit for bit, on every rank


class _FailsOnDown:
    """Wanda that fails on down_proj: the rank that owns it must not leave the others waiting."""

    name, needs = "fails-on-down", ("norms",)

    def prune(self, weight, stats, pattern):
        from llmprune.guards import NumericalError

        if weight.shape[0] < weight.shape[1]:  # down_proj: [hidden, intermediate]
            raise NumericalError("down_proj went wrong")
        return llmprune.methods.Wanda().prune(weight, stats, pattern)


def _failing_rank(rank, size, port, tokens, results):
    import torch.distributed as dist

    from llmprune.runner import prune_blocks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        world = distributed.World(rank, size, rank)
        try:
            prune_blocks(tiny_model("llama", layers=1), _FailsOnDown(), Unstructured(0.5),
                         distributed.shard(tokens, 2, world), CPU, 2, False,
                         reduce_statistics=distributed.reducer(world), share_layers=distributed.layer_share(world))
            results[rank] = "finished"
        except Exception as exc:  # noqa: BLE001
            results[rank] = f"{type(exc).__name__}: {exc}"
    finally:
        dist.destroy_process_group()


def test_a_failure_on_one_rank_reaches_every_rank():
    tokens = random_tokens(6, 16)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_failing_rank, args=(3, _free_port(), tokens, results), nprocs=3, join=True)
        seen = [results[r] for r in range(3)]
    assert all(s.startswith("NumericalError: ") and "down_proj went wrong" in s for s in seen), seen
