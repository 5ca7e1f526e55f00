"""Several processes (``torchrun --nproc-per-node K -m llmprune prune ...``): calibration batches are
split across ranks, each block's statistics are summed over ranks with ``torch.distributed``
(NCCL on GPUs, gloo on CPUs), and every rank computes the same masks from the same sums.

Statistics are fp64 sums of per-batch fp32 terms (see ``stats``), and the batches are split on
batch boundaries, so the summed statistics, hence the masks and weights, are the ones a single
process computes from the same tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import devices
from .errors import UsageError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True in a process started by torchrun (or anything that sets its environment) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_spec: str = "auto") -> tuple[World, str]:
    """Join the process group torchrun set up; returns the world and this rank's device spec."""
    if not launched():
        return World(), device_spec
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    spec = (device_spec or "auto").lower()
    use_cuda = devices.cuda_available() and spec in ("auto", "cuda")
    if spec.startswith("cuda:"):
        raise UsageError(f"--device {spec}: under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda or auto")
    gpu = devices.use_gpu(local) if use_cuda else None
    if not dist.is_initialized():
        # long timeout: rank 0 evaluates the dense model while the others wait at the first reduction
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(hours=4), device_id=gpu)
    return World(rank, size, local), (f"cuda:{local}" if use_cuda else "cpu")


def shard(tokens: torch.Tensor, batch_size: int, world: World) -> torch.Tensor:
    """This rank's calibration windows: a contiguous run of whole batches, so batches are the same as in one process."""
    if world.size == 1:
        return tokens
    batches = -(-tokens.shape[0] // batch_size)
    if batches < world.size:
        raise UsageError(
            f"--nsamples {tokens.shape[0]} with --batch-size {batch_size} makes {batches} batch(es) for {world.size} "
            f"processes; use --batch-size {max(1, tokens.shape[0] // world.size)} or more samples")
    per, extra = divmod(batches, world.size)
    first = world.rank * per + min(world.rank, extra)
    count = per + (world.rank < extra)
    return tokens[first * batch_size : (first + count) * batch_size]


def all_reduce_statistics(collector) -> None:
    """Sum every accumulator of a block over ranks, in the same order on each rank."""
    for name in collector.stats:
        for acc in collector.stats[name].values():
            for t in acc.tensors():
                dist.all_reduce(t)
            counts = [acc.tokens, getattr(acc, "windows", 0)]
            count = torch.tensor(counts, dtype=torch.float64, device=acc.tensors()[0].device)
            dist.all_reduce(count)
            acc.tokens = int(count[0].item())
            if hasattr(acc, "windows"):
                acc.windows = int(count[1].item())


def reducer(world: World):
    return all_reduce_statistics if world.size > 1 else None


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
