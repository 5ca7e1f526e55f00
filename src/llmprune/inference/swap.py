"""Swaps of a model's 2:4 Linears for sparse cores, fused where Linears share their input, and back."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UsageError
from ..models import find_decoder
from .kernel import BUCKETS, Plan, SparseCore, is_2to4
from .planning import plan_cores

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Linears that share their input


class _Fused:
    """Shared state of a fused group: the first member's call computes all outputs for that input."""

    def __init__(self, core: SparseCore, sizes: list[int]):
        self.core, self.bounds = core, []
        start = 0
        for s in sizes:
            self.bounds.append((start, start + s))
            start += s
        self.x = self.y = None
        self.left = 0

    def slice(self, x: torch.Tensor, index: int) -> torch.Tensor:
        if self.left == 0 or self.x is not x:
            self.x, self.y, self.left = x, self.core(x), len(self.bounds)
        a, b = self.bounds[index]
        out = self.y[..., a:b]
        self.left -= 1
        if self.left == 0:
            self.x = self.y = None
        return out


class FusedMember(nn.Module):
    """Stands in for one Linear of a fused group (e.g. k_proj of q/k/v); ``weight`` is a view of the fused one."""

    def __init__(self, group: _Fused, index: int, core: SparseCore):
        super().__init__()
        self.group, self.index = group, index
        a, b = group.bounds[index]
        self.weight = core.dense[a:b]
        if index == 0:
            self.core = core  # registered once, so .to()/state_dict see it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.slice(x, self.index)


def _cat(tensors):
    return None if any(t is None for t in tensors) else torch.cat(tensors)


@torch.no_grad()
def swap_block(block: nn.Module, plan: Plan, fuse: bool = True) -> dict:
    """Replace the 2:4 Linears of one decoder block by sparse cores; returns {path: (parent, name, Linear)}.

    Linears reading the same input (Llama-style q/k/v and gate/up) become one fused sparse matmul.
    Linears that are not 2:4 stay as they are.
    """
    originals = {}
    linears = {p: m for p, m in block.named_modules() if type(m) is nn.Linear and is_2to4(m.weight)}
    parents = {}
    for path in linears:
        parent, _, name = path.rpartition(".")
        parents.setdefault(parent, []).append(name)
    for parent_path, names in parents.items():
        parent = block.get_submodule(parent_path) if parent_path else block
        done = set()
        for group in GROUPS if fuse else ():
            if all(n in names for n in group):
                lins = [getattr(parent, n) for n in group]
                core = SparseCore(torch.cat([m.weight for m in lins]), _cat([m.bias for m in lins]), plan)
                fused = _Fused(core, [m.out_features for m in lins])
                for i, n in enumerate(group):
                    originals[f"{parent_path}.{n}".lstrip(".")] = (parent, n, lins[i])
                    setattr(parent, n, FusedMember(fused, i, core))
                done.update(group)
        for n in names:
            if n not in done:
                lin = getattr(parent, n)
                originals[f"{parent_path}.{n}".lstrip(".")] = (parent, n, lin)
                setattr(parent, n, SparseCore(lin.weight, lin.bias, plan))
    return originals


def restore(originals: dict) -> None:
    for parent, name, lin in originals.values():
        setattr(parent, name, lin)


def cores_of(model: nn.Module) -> list[SparseCore]:
    return [m for m in model.modules() if isinstance(m, SparseCore)]


def sparsify(model: nn.Module, fuse: bool = True, buckets=BUCKETS, reps: int = 10) -> tuple[dict, Plan]:
    """Swap every 2:4 Linear of the decoder blocks for a sparse core and plan dense/sparse per bucket.

    Returns ``(originals, plan)``; ``restore(originals)`` puts the plain Linears back.
    """
    plan = Plan()
    originals = {}
    for i, block in enumerate(find_decoder(model)[1]):
        for k, v in swap_block(block, plan, fuse).items():
            originals[f"{i}.{k}"] = v
    if not originals:
        raise UsageError("no 2:4 Linear found in the decoder blocks; prune with --pattern 2:4 first")
    plan_cores(cores_of(model), plan, buckets, reps)
    return originals, plan
