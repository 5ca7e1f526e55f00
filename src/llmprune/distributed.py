"""Several processes (``torchrun --nproc-per-node K -m llmprune prune ...``): calibration batches are
split across ranks, each block's statistics are summed over ranks with ``torch.distributed``
(NCCL on GPUs, gloo on CPUs), then each rank prunes a share of the block's Linears, balanced by their cost
(``layer_owners``), and broadcasts them (``LayerShare``): every rank ends each block with the same weights.

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


def layer_cost(shape: tuple[int, int], needs: tuple[str, ...]) -> tuple[int, int]:
    """(pruning cost, cost of factorising its input's statistic once) of one Linear, in rough multiply-adds: a
    Hessian method (SparseGPT, ALPS) works on rows x cols^2 and factorises a cols x cols matrix (cols^3 / 3);
    a score method touches each weight a few times."""
    rows, cols = shape
    if "hessian" in needs:
        return rows * cols * cols, cols**3 // 3
    return rows * cols, 0


def layer_owners(shapes: dict[str, tuple[int, int]], inputs: dict[str, str], needs: tuple[str, ...],
                 size: int) -> dict[str, int]:
    """The rank that prunes each Linear: the costliest first, each onto the rank it finishes soonest on (a
    Hessian's factorisation is charged once per rank that reads that input: Linears sharing an input are
    cheaper together). The same on every rank: it depends on the shapes alone (ties by name)."""
    load, seen, owners = [0] * size, [set() for _ in range(size)], {}
    order = sorted(shapes, key=lambda n: (-sum(layer_cost(shapes[n], needs)), n))
    for name in order:
        work, factor = layer_cost(shapes[name], needs)
        finish = [load[r] + work + (0 if inputs[name] in seen[r] else factor) for r in range(size)]
        rank = min(range(size), key=lambda r: (finish[r], r))
        owners[name], load[rank] = rank, finish[rank]
        seen[rank].add(inputs[name])
    return owners


class LayerShare:
    """Each rank prunes its share of a block's Linears (``layer_owners``); the pruned weights are then broadcast
    from their owner, so every rank ends with the whole pruned block. Each Linear is pruned by the same code
    from the same summed statistics as when every rank prunes all of them, so weights and masks are equal bit
    for bit; only the time is divided."""

    def __init__(self, world: World) -> None:
        self.world = world

    def __call__(self, layers: dict, prune_one, needs: tuple[str, ...], input_of) -> list:
        from .models import weight_matrix

        shapes = {name: tuple(weight_matrix(layer).shape) for name, layer in layers.items()}
        owners = layer_owners(shapes, {name: input_of(name) for name in layers}, needs, self.world.size)
        mine, error = {}, None
        for name in layers:
            if owners[name] == self.world.rank and error is None:
                try:
                    mine[name] = prune_one(name)
                except Exception as exc:  # noqa: BLE001 - every rank must learn of it, or the others wait forever
                    error = exc
        shared = [None] * self.world.size
        dist.all_gather_object(shared, (mine, None if error is None else (type(error).__name__, str(error))))
        _raise_first(shared, error, self.world.rank)
        for name, layer in layers.items():
            dist.broadcast(layer.weight.data, src=owners[name])
        return [shared[owners[name]][0][name] for name in layers]


def _raise_first(shared: list, error: BaseException | None, rank: int) -> None:
    """Raise on every rank the first rank's failure: the original on its own rank, the same kind elsewhere."""
    from .guards import NumericalError

    for other, (_, failure) in enumerate(shared):
        if failure is None:
            continue
        if other == rank and error is not None:
            raise error
        kind = {"NumericalError": NumericalError, "UsageError": UsageError}.get(failure[0], RuntimeError)
        raise kind(f"{failure[1]} (on process {other})")


def layer_share(world: World) -> LayerShare | None:
    return LayerShare(world) if world.size > 1 else None


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def finish(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
