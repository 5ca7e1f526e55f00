"""Swaps of a model's 2:4 Linears for sparse cores, fused where Linears share their input, and back.

A Linear pruned with ``--permute`` is 2:4 only in its own input-column order (``perms``). Where its input is,
channel by channel, a function of other Linears' output rows (``FOLDS``), the order is folded into those
Linears: their output rows and biases are permuted, the Linear's columns with them, and the block computes the
same function with no gather at run time. Everywhere else its core gathers the activation's columns first
(``kernel.SparseCore``'s ``perm``). Why the other Linears are not folded:
- q/k/v and gate/up (OPT: q/k/v and fc1; GPT-NeoX: query_key_value and dense_h_to_4h) read the block's normed
  hidden state. Folding their order would mean permuting the residual stream, which the embeddings, every norm
  and every block share: possible for one order of the whole model, not for one order per Linear.
- o_proj (OPT out_proj, GPT-NeoX dense) reads the attention output, channel (head h, dim d) of
  softmax(q_h k_g^T) v_g. Permuting v_proj's output rows moves v's channels, but a channel cannot leave its head
  (it would be mixed by another head's attention weights), and with GQA every query head of a KV group reads the
  same v, so only one within-head order per KV group could be folded. The orders ``permute.nm_permutation``
  finds move channels across heads, so o_proj gathers.
Linears with an order are not fused with the others of their group: each gathers its own order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..models import find_decoder
from ..permute import is_order
from .kernel import BUCKETS, Plan, SparseCore, in_order, is_2to4
from .planning import plan_cores

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Linears that share their input
FOLDS = (("down_proj", ("gate_proj", "up_proj")), ("fc2", ("fc1",)), ("dense_4h_to_h", ("dense_h_to_4h",)))
"""(Linear, the Linears of the same parent module that produce its input): Llama-style MLPs (Mistral, Qwen, Gemma)
compute down_proj(act(gate_proj(x)) * up_proj(x)), OPT fc2(act(fc1(x))), GPT-NeoX dense_4h_to_h(act(dense_h_to_4h(x))):
input channel c is an elementwise function of output row c of the producers alone."""


@dataclass(frozen=True)
class LinearSpec:
    """What a core is built from: weight [out, in], bias, and the input order the weight is 2:4 in (None: as stored)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    perm: torch.Tensor | None = None

    @property
    def is_24(self) -> bool:
        return is_2to4(in_order(self.weight, self.perm))


def fold_order(consumer: LinearSpec, producers: list[LinearSpec]) -> tuple[LinearSpec, list[LinearSpec]]:
    """The consumer's input order moved onto its producers' output rows: the consumer's W[:, p] (2:4 as stored
    now), each producer's W[p] and b[p] (their own input orders unchanged)."""
    p = consumer.perm
    return (LinearSpec(consumer.weight[:, p], consumer.bias),
            [LinearSpec(s.weight[p], None if s.bias is None else s.bias[p], s.perm) for s in producers])


def _join(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def fold_block(specs: dict[str, LinearSpec]) -> set[str]:
    """Fold, in ``specs`` (path in the block -> spec), every order ``FOLDS`` allows where the Linear and all its
    producers become sparse cores; returns the folded Linears' paths."""
    folded = set()
    for path, spec in list(specs.items()):
        parent, _, name = path.rpartition(".")
        producers = next((ps for consumer, ps in FOLDS if consumer == name), None)
        if spec.perm is None or producers is None:
            continue
        paths = [_join(parent, n) for n in producers]
        if not (spec.is_24 and all(p in specs and specs[p].is_24 for p in paths)):
            continue  # a producer that stays a plain Linear keeps its rows: the Linear gathers instead
        specs[path], moved = fold_order(spec, [specs[p] for p in paths])
        specs.update(zip(paths, moved))
        folded.add(path)
    return folded


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


def _specs(linears: dict[str, nn.Linear], perms: dict[str, torch.Tensor]) -> dict[str, LinearSpec]:
    """Each Linear's spec with its order from ``perms`` (path -> order), every order checked."""
    for path, perm in perms.items():
        lin = linears.get(path)
        if lin is None:
            raise UsageError(f"an input permutation is given for {path!r}, which is not a Linear of this block")
        if not is_order(perm, lin.in_features):
            raise UsageError(f"the input permutation of {path} is not an order of its {lin.in_features} columns")
    return {p: LinearSpec(m.weight, m.bias, None if perms.get(p) is None else perms[p].long())
            for p, m in linears.items()}


@torch.no_grad()
def swap_block(block: nn.Module, plan: Plan, fuse: bool = True, perms: dict | None = None, fold: bool = True) -> dict:
    """Replace the 2:4 Linears of one decoder block by sparse cores; returns {path: (parent, name, Linear)}.

    Linears reading the same input (Llama-style q/k/v and gate/up) become one fused sparse matmul.
    ``perms`` (path in the block -> input order) makes the Linears pruned with ``--permute`` 2:4; ``fold``
    moves the orders ``FOLDS`` allows into the producing Linears (see the module docstring). Linears that are
    not 2:4 (in their order) stay as they are; the replaced Linears are not changed, so ``restore`` undoes it all.
    """
    linears = {p: m for p, m in block.named_modules() if type(m) is nn.Linear}
    specs = _specs(linears, perms or {})
    if fold:
        fold_block(specs)
    parents = {}
    for path in (p for p, s in specs.items() if s.is_24):
        parent, _, name = path.rpartition(".")
        parents.setdefault(parent, []).append(name)
    originals = {}
    for parent_path, names in parents.items():
        parent = block.get_submodule(parent_path) if parent_path else block
        done = set()
        for group in GROUPS if fuse else ():
            paths = [_join(parent_path, n) for n in group]
            if all(n in names for n in group) and all(specs[p].perm is None for p in paths):
                members = [specs[p] for p in paths]
                core = SparseCore(torch.cat([s.weight for s in members]), _cat([s.bias for s in members]), plan)
                fused = _Fused(core, [s.weight.shape[0] for s in members])
                for i, n in enumerate(group):
                    originals[paths[i]] = (parent, n, getattr(parent, n))
                    setattr(parent, n, FusedMember(fused, i, core))
                done.update(group)
        for n in names:
            if n not in done:
                path, spec = _join(parent_path, n), specs[_join(parent_path, n)]
                originals[path] = (parent, n, getattr(parent, n))
                setattr(parent, n, SparseCore(spec.weight, spec.bias, plan, spec.perm))
    return originals


def restore(originals: dict) -> None:
    for parent, name, lin in originals.values():
        setattr(parent, name, lin)


def cores_of(model: nn.Module) -> list[SparseCore]:
    return [m for m in model.modules() if isinstance(m, SparseCore)]


def orders_by_block(model: nn.Module, perms: dict | None) -> list[dict]:
    """``perms`` (Linear name in the model, ``model.layers.0.mlp.down_proj``, or its weight's name -> order) split
    per decoder block into paths inside the block; a name outside the blocks is refused."""
    blocks = find_decoder(model)[1]
    names = {id(m): n for n, m in model.named_modules()}
    left = {k.removesuffix(".weight"): v for k, v in (perms or {}).items()}
    out = []
    for block in blocks:
        prefix = f"{names[id(block)]}."
        mine = [k for k in left if k.startswith(prefix)]
        out.append({k[len(prefix):]: left.pop(k) for k in mine})
    if left:
        raise UsageError(f"an input permutation is given for {next(iter(left))!r}, which is not a Linear of the "
                         "decoder blocks")
    return out


def sparsify(model: nn.Module, fuse: bool = True, buckets=BUCKETS, reps: int = 10, perms: dict | None = None,
             fold: bool = True) -> tuple[dict, Plan]:
    """Swap every 2:4 Linear of the decoder blocks for a sparse core and plan dense/sparse per bucket.

    ``perms``: the input orders of a model pruned with ``--permute`` (``PruneResult.permutations()``, or
    ``compressed.permutations(folder)`` for a model from ``llmprune.load(folder)``); ``fold``: fold them into the
    producing Linears where that is exact (else every permuted Linear gathers). Returns ``(originals, plan)``;
    ``restore(originals)`` puts the plain Linears back.
    """
    plan = Plan()
    originals = {}
    for i, (block, orders) in enumerate(zip(find_decoder(model)[1], orders_by_block(model, perms))):
        for k, v in swap_block(block, plan, fuse, orders, fold).items():
            originals[f"{i}.{k}"] = v
    if not originals:
        raise UsageError("no 2:4 Linear found in the decoder blocks; prune with --pattern 2:4 first")
    plan_cores(cores_of(model), plan, buckets, reps)
    return originals, plan
