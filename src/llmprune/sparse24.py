"""2:4 inference on CUDA through cuSPARSELt, called directly (no tensor subclass, no F.linear dispatch).

Each pruned Linear (or a fused group: q/k/v, gate/up) keeps its weight twice: compressed for
``torch._cslt_sparse_mm`` and dense for the token counts where dense is faster. Which one runs is
decided per weight shape and token-count bucket by timing both once, at swap time (``plan``).

Layout: cuSPARSELt multiplies sparse(A) @ dense(B). With A = W [out, in] (2:4 along ``in``) and
B = x^T (a free transposed view of the row-major activations), ``transpose_result=True`` makes the
product come out as y = x W^T, row-major [tokens, out]: no copy before or after the kernel.
"""

from __future__ import annotations

import inspect
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # token counts timed at swap time
MARGIN = 0.95  # sparse must be at least 5% faster to be chosen: ties go to dense
PAD = 8  # cuSPARSELt's dense operand needs a multiple of 8 columns in bf16/fp16
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # Linears that share their input


@dataclass(frozen=True)
class Algo:
    """A cuSPARSELt configuration: the algorithm id (split-k stays at the library's default)."""

    alg: int = 0


def _search(packed: torch.Tensor, b: torch.Tensor) -> int:
    """The algorithm id cuSPARSELt's own search picks: ``torch._C._cusparselt.mm_search`` where torch has it
    (its split-k results are dropped, see ``search_algos``), else the older ``torch._cslt_sparse_mm_search``."""
    cslt = getattr(torch._C, "_cusparselt", None)
    if cslt is not None and hasattr(cslt, "mm_search"):
        return int(cslt.mm_search(packed, b, None, None, None, True)[0])
    return int(torch._cslt_sparse_mm_search(packed, b, transpose_result=True))


def _mm(packed: torch.Tensor, b: torch.Tensor, bias, algo: Algo) -> torch.Tensor:
    return torch._cslt_sparse_mm(packed, b, bias, transpose_result=True, alg_id=algo.alg)


class Kernels:
    """The three cuSPARSELt entry points; replaced by an emulation in CPU tests."""

    compress = staticmethod(lambda w: torch._cslt_compress(w))
    search = staticmethod(_search)
    mm = staticmethod(_mm)


def is_2to4(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    if cols % 4:
        return False
    return bool(((weight.reshape(rows, cols // 4, 4) != 0).sum(-1) <= 2).all())


def bucket_of(tokens: int) -> int:
    """The smallest timed token count >= ``tokens`` (the largest beyond the last)."""
    for b in BUCKETS:
        if tokens <= b:
            return b
    return BUCKETS[-1]


@dataclass
class Choice:
    sparse: bool = False
    algo: Algo = Algo()


@dataclass
class Plan:
    """Per (out, in, dtype) and token bucket: sparse or dense, and the cuSPARSELt algorithm id."""

    choices: dict = field(default_factory=dict)
    timings: list = field(default_factory=list)
    force: bool | None = None  # True: sparse everywhere, False: dense everywhere (tests, checks)
    mode: str = "eager"  # "graph" while capturing a CUDA graph: choices timed as GPU time alone

    def get(self, key, tokens: int) -> Choice:
        b = bucket_of(tokens)
        choice = self.choices.get((self.mode, key, b)) or self.choices.get(("eager", key, b), Choice())
        return choice if self.force is None else Choice(self.force, choice.algo)

    @contextmanager
    def capturing(self):
        """While a CUDA graph is captured: each Linear takes the choice timed as GPU time alone ("graph").

        The choice is made in Python during capture, so a replay runs only the kernels chosen then.
        """
        before, self.mode = self.mode, "graph"
        try:
            yield self
        finally:
            self.mode = before


class SparseCore(nn.Module):
    """y = x W^T (+ b) with W kept dense and cuSPARSELt-compressed; the plan picks per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, plan: Plan):
        super().__init__()
        if weight.is_cuda and weight.dtype == torch.float16:
            raise UsageError("the 2:4 GPU path runs in bfloat16 only: in float16 cuSPARSELt's search fails (algorithm "
                             "id 36 raises an illegal instruction on the H200, torch 2.11) and algorithm 0 is slower "
                             "than dense; load the model with --dtype bfloat16")
        if not is_2to4(weight):
            raise UsageError(f"a {tuple(weight.shape)} weight is not 2:4 sparse; prune it with --pattern 2:4 first")
        self.register_buffer("dense", weight, persistent=False)
        self.register_buffer("bias", bias, persistent=False)
        self.register_buffer("packed", Kernels.compress(weight), persistent=False)
        self.plan = plan
        self.key = (weight.shape[0], weight.shape[1], str(weight.dtype))

    def sparse_mm(self, x2: torch.Tensor, algo: Algo = Algo()) -> torch.Tensor:
        t = x2.shape[0]
        pad = (-t) % PAD
        if pad:
            x2 = F.pad(x2, (0, 0, 0, pad))
        y = Kernels.mm(self.packed, x2.t(), self.bias, algo)
        return y[:t] if pad else y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        choice = self.plan.get(self.key, x2.shape[0])
        if not choice.sparse:
            return F.linear(x, self.dense, self.bias)
        return self.sparse_mm(x2, choice.algo).view(*x.shape[:-1], self.dense.shape[0])


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


def timeit(fn, reps: int, warmup: int = 1) -> float:
    """Seconds per call of back-to-back calls (host cost included), median of 3 rounds."""
    for _ in range(warmup):
        fn()
    rounds = []
    for _ in range(3):
        _sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync()
        rounds.append((time.perf_counter() - t0) / reps)
    return sorted(rounds)[1]


def graph_time(fn, reps: int = 10) -> float:
    """Seconds per call, GPU time alone: ``reps`` calls captured in one CUDA graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    t = timeit(graph.replay, reps=3) / reps
    del graph
    return t


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def search_algos(core: "SparseCore", x: torch.Tensor) -> list[Algo]:
    """The configurations to time for input ``x``: cuSPARSELt's own pick (algorithm 0 where the search fails).

    Split-k is not among them: on the H200 (torch 2.11, cuSPARSELt 0.8) the search never proposes it
    (split_k -1), and setting split-k 2 or 4 by hand is refused ("invalid value").
    """
    xp = F.pad(x, (0, 0, 0, (-x.shape[0]) % PAD))
    try:
        alg = Kernels.search(core.packed, xp.t())
    except RuntimeError:
        return [Algo()]
    return [Algo(int(alg))]


def choose(dense_s: float, sparse_s: dict) -> tuple[Choice, float]:
    """The fastest sparse configuration, used only if it beats dense by the margin; returns (choice, its time)."""
    algo = min(sparse_s, key=sparse_s.get)
    return Choice(sparse_s[algo] < MARGIN * dense_s, algo), sparse_s[algo]


@torch.no_grad()
def plan_cores(cores: list[SparseCore], plan: Plan, buckets=BUCKETS, reps: int = 10) -> Plan:
    """Time dense vs sparse (cuSPARSELt's best configuration) once per distinct weight shape and token bucket.

    Two timings: back-to-back calls ("eager": cuSPARSELt's per-call host cost, ~0.5 ms in torch 2.11,
    counts) and CUDA-graph replay ("graph": GPU time alone, used while a graph is being captured).
    Where ``search_algos`` offers several configurations the fastest is kept.
    """
    seen = {}
    for core in cores:
        seen.setdefault(core.key, core)
    for key, core in seen.items():
        for t in buckets:
            x = torch.randn(t, core.dense.shape[1], dtype=core.dense.dtype, device=core.dense.device)
            algos = search_algos(core, x)
            modes = {"eager": timeit}
            if x.is_cuda:
                modes["graph"] = graph_time
            for mode, timer in modes.items():
                dense_s = timer(lambda: F.linear(x, core.dense, core.bias), reps)
                sparse_s = {a: timer(lambda: core.sparse_mm(x, a), reps) for a in algos}
                choice, best = choose(dense_s, sparse_s)
                plan.choices[(mode, key, t)] = choice
                plan.timings.append({"mode": mode, "shape": list(key[:2]), "dtype": key[2], "tokens": t,
                                     "alg": choice.algo.alg, "dense_ms": dense_s * 1e3, "sparse_ms": best * 1e3,
                                     "candidates": [{"alg": a.alg, "ms": v * 1e3} for a, v in sparse_s.items()],
                                     "chosen": "sparse" if choice.sparse else "dense"})
    return plan


def cores_of(model: nn.Module) -> list[SparseCore]:
    return [m for m in model.modules() if isinstance(m, SparseCore)]


def sparsify(model: nn.Module, fuse: bool = True, buckets=BUCKETS, reps: int = 10) -> tuple[dict, Plan]:
    """Swap every 2:4 Linear of the decoder blocks for a sparse core and plan dense/sparse per bucket.

    Returns ``(originals, plan)``; ``restore(originals)`` puts the plain Linears back.
    """
    from .models import find_decoder

    plan = Plan()
    originals = {}
    for i, block in enumerate(find_decoder(model)[1]):
        for k, v in swap_block(block, plan, fuse).items():
            originals[f"{i}.{k}"] = v
    if not originals:
        raise UsageError("no 2:4 Linear found in the decoder blocks; prune with --pattern 2:4 first")
    plan_cores(cores_of(model), plan, buckets, reps)
    return originals, plan


# ---------------------------------------------------------------- decoding under a CUDA graph


def cache_kwarg(model: nn.Module) -> str:
    """The name a transformers model takes its KV cache under: ``cache`` (>= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class StaticDecoder:
    """Greedy decoding over a transformers ``StaticCache``; on CUDA one decode step is a captured CUDA graph.

    The prompt fills the cache eagerly. A step is: forward of the last token, argmax written into a fixed
    token buffer. transformers' static cache keeps its fill level as a GPU tensor that the step itself
    advances, so one replay is one whole decode step with no Python in between. With a sparse ``plan``
    each Linear's dense/sparse choice is made during capture (``Plan.capturing``: GPU-time choices) and
    costs nothing at replay. ``graph=False`` runs the same step eagerly (CPU, or a reference on CUDA).
    """

    def __init__(self, model: nn.Module, prompt_ids: torch.Tensor, max_len: int, plan: Plan | None = None,
                 graph: bool | None = None, warmup: int = 2):
        from transformers import StaticCache

        graph = prompt_ids.is_cuda if graph is None else graph
        if prompt_ids.shape[1] + (warmup if graph else 0) >= max_len:
            raise UsageError(f"a static cache of {max_len} positions cannot hold a {prompt_ids.shape[1]}-token "
                             f"prompt, {warmup if graph else 0} warm-up steps and one more; give a larger max_len")
        self.model, self.kw, self.max_len, self.plan = model, cache_kwarg(model), max_len, plan
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        with torch.no_grad():
            out = model(input_ids=prompt_ids, use_cache=True, logits_to_keep=1, **{self.kw: self.cache})
        self.tok = out.logits[:, -1:].argmax(-1)
        self.logits = out.logits[:, -1]
        self.pos = prompt_ids.shape[1]
        self.history = [self.tok.clone()]
        self.graph = None
        if graph:
            self._capture(warmup)

    @torch.no_grad()
    def _step(self) -> None:
        out = self.model(input_ids=self.tok, use_cache=True, logits_to_keep=1, **{self.kw: self.cache})
        self.logits = out.logits[:, -1]
        self.tok.copy_(self.logits.argmax(-1, keepdim=True))

    def _capture(self, warmup: int) -> None:
        plan = self.plan or Plan()
        with plan.capturing():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):  # real decode steps: they fill the cache too
                    self._step()
                    self.history.append(self.tok.clone())
            torch.cuda.current_stream().wait_stream(stream)
            self.pos += warmup
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
        self.graph = graph

    def step(self) -> torch.Tensor:
        """One decode step; returns the live token buffer [batch, 1] (overwritten by the next step)."""
        if self.pos >= self.max_len:
            raise UsageError(f"the static cache is full ({self.max_len} positions); build the decoder with a larger max_len")
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.pos += 1
        return self.tok

    def generate(self, steps: int) -> torch.Tensor:
        """``steps`` more tokens; returns every token produced so far (prompt's next token first) [batch, n]."""
        for _ in range(steps):
            self.history.append(self.step().clone())
        return torch.cat(self.history, dim=1)

    def close(self) -> None:
        self.graph = self.cache = self.tok = self.logits = None
