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
