"""Peak memory of a pruning run, estimated before it starts, and the decision where activations live.

Pure arithmetic on a few sizes read off the model (``ModelSizes``); the free memory is asked of
``devices``. The estimate is meant to be on the safe side: it counts the largest block, the
calibration hidden states, one batch's working set through the widest Linear, and the
statistics and pruning work of one block.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import UsageError
from .models import find_decoder, prunable_layers, weight_matrix

GiB = 1024**3
CPU_HEAP_MARGIN = 1.25
"""On a CPU the heap holds more than the tensors alive in it: measured peaks were up to 1.22x the tensor
arithmetic (benchmarks/cpu_memory.py, SmolLM2, 256 and 2048 windows), so the CPU estimate is scaled by this."""


@dataclass(frozen=True)
class ModelSizes:
    hidden: int
    widest: int  # widest Linear dimension in a block (the MLP's intermediate size)
    elem: int  # bytes per activation element
    block_bytes: int  # largest decoder block
    stem_bytes: int  # embeddings, rotary, final norm: on the device while block-0 inputs are captured
    on_device_bytes: int  # parameters and buffers already on the compute device
    hessian_sizes: tuple[int, ...]  # input width of each distinct Linear input of a block (estimated)
    largest_weight: tuple[int, int]
    eager_attention_heads: int = 0  # heads, when attention materialises seqlen x seqlen scores

    @classmethod
    def of(cls, model: nn.Module, device: torch.device, whole_model_on_device: bool = False) -> "ModelSizes":
        """Sizes read off ``model``; ``whole_model_on_device``: as if every tensor were already on ``device``."""
        decoder, blocks = find_decoder(model)

        def nbytes(module, only_on=None):
            ts = list(module.parameters()) + list(module.buffers())
            return sum(t.numel() * t.element_size() for t in ts if only_on is None or t.device == only_on)

        layers = [weight_matrix(m).shape for b in blocks[:1] for m in prunable_layers(b).values()]
        widths = Counter(shape[1] for shape in layers)
        # Linears reading one tensor (q/k/v, gate/up) come in groups of two or three: count half of each width
        hessians = tuple(d for d, n in sorted(widths.items()) for _ in range(math.ceil(n / 2)))
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        eager = getattr(model.config, "_attn_implementation", "eager") == "eager"
        heads = int(getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_head", 0) or 0)
        param = next(blocks[0].parameters())
        stem = sum(nbytes(c) for c in decoder.children() if c is not blocks)
        return cls(
            hidden=max(min(s) for s in layers), widest=max(max(s) for s in layers), elem=param.element_size(),
            block_bytes=max(nbytes(b) for b in blocks), stem_bytes=stem,
            on_device_bytes=0 if device.type == "cpu" else nbytes(model) if whole_model_on_device else nbytes(model, device),
            hessian_sizes=hessians, largest_weight=max(layers, key=lambda s: s[0] * s[1]),
            eager_attention_heads=heads if eager else 0,
        )


@dataclass(frozen=True)
class Estimate:
    device_bytes: int  # peak on the compute device (0 when it is the CPU: then everything is in ``cpu_bytes``)
    cpu_bytes: int  # memory this run adds in the process (offloaded activations)
    offload: bool
    parts: dict = field(default_factory=dict)

    def breakdown(self) -> str:
        return ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.parts.items() if v) + " GiB"

    def describe(self, device: torch.device) -> str:
        where = "pinned CPU memory" if self.offload else str(device)
        peak = f"peak {device} {self.device_bytes / GiB:.2f} GiB, " if device.type != "cpu" else ""
        return f"memory estimate: {peak}CPU +{self.cpu_bytes / GiB:.2f} GiB; activations in {where} ({self.breakdown()})"


WORK_BYTES = (8, 12)
"""A weight-updating method's working memory while it prunes its largest Linear [rows, cols]: bytes per weight entry
and per entry of a [cols, cols] matrix (SparseGPT's; a method may declare its own ``work_bytes``)."""


def estimate(sizes: ModelSizes, nsamples: int, seqlen: int, batch_size: int, needs: tuple[str, ...],
             device: torch.device, offload: bool, method_work: tuple[int, int] = WORK_BYTES) -> Estimate:
    """Peak bytes of one process that prunes ``nsamples`` windows of ``seqlen`` tokens in batches."""
    gpu = device.type != "cpu"
    offload = offload and gpu
    acts = nsamples * seqlen * sizes.hidden * sizes.elem if needs else 0
    tokens = min(batch_size, nsamples) * seqlen
    work = 0
    if needs:
        # MLP activations in the model's dtype, the fp32 copies a statistic makes, attention inputs and outputs
        work = tokens * (3 * sizes.widest * sizes.elem + 6 * sizes.hidden * sizes.elem) + min(tokens, 4096) * sizes.widest * 8
        work += min(batch_size, nsamples) * sizes.eager_attention_heads * seqlen * seqlen * (sizes.elem + 4)
    stats = 0
    prune_work = 0
    if "hessian" in needs:
        stats = sum(8 * d * d for d in sizes.hessian_sizes) + 4 * max(sizes.hessian_sizes) ** 2
        rows, cols = sizes.largest_weight
        prune_work = method_work[0] * rows * cols + method_work[1] * cols * cols + 12 * (1 << 25)
    resident = sizes.on_device_bytes
    block = 0 if resident or not gpu else sizes.block_bytes  # on a CPU device the model is already in memory
    stem = 0 if resident or not gpu else sizes.stem_bytes
    on_device_acts = 0 if offload else acts
    parts = {"model": resident, "block": block, "activations": acts, "batch": work, "statistics": stats + prune_work}
    capture = stem + on_device_acts + 4 * tokens * sizes.hidden * sizes.elem
    per_block = block + on_device_acts + work + stats + prune_work
    device_bytes = resident + max(capture, per_block) if needs else resident + block + prune_work
    if not gpu:
        return Estimate(0, int(CPU_HEAP_MARGIN * (device_bytes - resident)), False, parts)
    return Estimate(device_bytes, acts if offload else 0, offload, parts)


PLACEMENTS = ("auto", "gpu", "cpu")


def check_placement(value: str, flag: str) -> str:
    """Where activations (``--activations``) or weights (``--weights``) live on a GPU run: auto | gpu | cpu."""
    if value not in PLACEMENTS:
        raise UsageError(f"{flag} must be auto, gpu or cpu, got {value!r}")
    return value


def plan(sizes: ModelSizes, nsamples: int, seqlen: int, batch_size: int, needs: tuple[str, ...],
         device: torch.device, activations: str, device_free: int | None, cpu_free: int | None,
         work: tuple[int, int] = WORK_BYTES) -> Estimate:
    """Choose where activations live (``auto``: on the device when they fit) or refuse with the flags that fit."""
    check_placement(activations, "--activations")
    options = [False, True] if activations == "auto" else [activations == "cpu"]
    if device.type == "cpu":
        options = [False]
    for offload in options:
        est = estimate(sizes, nsamples, seqlen, batch_size, needs, device, offload, work)
        if _fits(est, device_free, cpu_free):
            return est
    raise UsageError(_refusal(est, sizes, nsamples, seqlen, batch_size, needs, device, device_free, cpu_free, work))


def whole_model_fits(model: nn.Module, nsamples: int, seqlen: int, batch_size: int, needs: tuple[str, ...],
                     device: torch.device, activations: str, device_free: int | None, cpu_free: int | None,
                     work: tuple[int, int] = WORK_BYTES) -> bool:
    """Whether the run fits with every weight moved to ``device`` first (no block then travels to and fro)."""
    if device.type == "cpu":
        return False
    sizes = ModelSizes.of(model, device, whole_model_on_device=True)
    already = ModelSizes.of(model, device).on_device_bytes
    free = None if device_free is None else device_free + already
    try:
        # activations that would not fit beside the model are better on the GPU with the model in CPU memory
        est = plan(sizes, nsamples, seqlen, batch_size, needs, device, "gpu" if activations == "auto" else activations,
                   free, cpu_free, work)
    except UsageError:
        return False
    return free is None or est.device_bytes <= free


def _fits(est: Estimate, device_free: int | None, cpu_free: int | None) -> bool:
    """Free memory is what is left beside the parameters already on the device, so those are not counted twice."""
    new = est.device_bytes - est.parts.get("model", 0)
    return (device_free is None or new <= device_free) and (cpu_free is None or est.cpu_bytes <= cpu_free)


def _refusal(est, sizes, nsamples, seqlen, batch_size, needs, device, device_free, cpu_free, work) -> str:
    if device_free is not None and est.device_bytes > device_free:
        new = est.device_bytes - est.parts.get("model", 0)
        head = f"the run needs about {new / GiB:.1f} GiB more on {device} but {device_free / GiB:.1f} GiB are free"
    else:
        head = f"the run needs about {est.cpu_bytes / GiB:.1f} GiB more CPU memory but {cpu_free / GiB:.1f} GiB are free"
    fixes = []
    for offload in ([False, True] if device.type != "cpu" else [False]):
        flag = ["--activations cpu"] if offload else ["--activations gpu"] if device.type != "cpu" else []
        for batch in sorted({batch_size, *[b for b in (8, 4, 2, 1) if b < batch_size]}, reverse=True):
            for n in (nsamples, nsamples // 2, nsamples // 4):
                if n >= 1 and _fits(estimate(sizes, n, seqlen, batch, needs, device, offload, work), device_free, cpu_free):
                    extra = ([f"--batch-size {batch}"] if batch != batch_size else []) + (
                        [f"--nsamples {n}"] if n != nsamples else [])
                    fixes.append(" ".join(flag + extra))
                    break
            else:
                continue
            break
    hint = f"; these would fit: {' | '.join(fixes)}" if fixes else "; no smaller setting fits: use a larger device"
    return f"{head} ({est.breakdown()}){hint}"
