"""Structured pruning's options, the widths they give a model, and the record of a run.

``Structured`` is the typed option object (``--structure``, ``--remove`` or ``--widths``, ``--importance``,
``--restore``, ``--width-multiple``), validated on construction. ``plan_widths`` turns it and a model's
``surgery.Shape`` into uniform widths: the same intermediate size and KV-group count in every block, so the
saved config is a standard one. ``structured_runner`` does the work.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .errors import UsageError
from .methods.channels import IMPORTANCE, OBS_MAX_STEPS
from .surgery import Shape

STRUCTURES = ("mlp", "heads", "blocks")
RESTORES = ("none", "lsq", "lsq-dense", "bias")
OBJECTIVES = ("output", "post-norm")
ALLOCATIONS = ("uniform", "adaptive")
WIDTH_FIELDS = {"intermediate_size": "mlp", "num_key_value_heads": "heads", "num_hidden_layers": "blocks"}
"""``--widths`` keys (the config fields they set) and the structure each one shrinks."""


@dataclass(frozen=True)
class Structured:
    """What to remove and how: a smaller dense model with uniform widths."""

    structures: tuple[str, ...] = ("mlp", "heads")
    """Any of mlp (intermediate channels), heads (whole KV groups with their query heads), blocks."""
    remove: float | None = None
    """Target fraction of the decoder blocks' parameters to remove; None when ``widths`` are given."""
    widths: dict | None = None
    """Explicit widths instead of ``remove``: intermediate_size, num_key_value_heads, num_hidden_layers."""
    importance: str = "wanda-sp"
    """Channel score: wanda-sp | flap | magnitude, or the obs selection (``methods.channels``); blocks use
    ShortGPT's."""
    restore: str = "none"
    """none | lsq (re-fit down_proj / o_proj on the kept channels) | lsq-dense (the same re-fit onto the unshrunk
    model's outputs of that Linear: asymmetric, the pruned model's inputs against the dense ones) | bias (FLAP's
    compensation bias)."""
    multiple: int = 32
    """The intermediate size is rounded to a multiple of this."""
    damp: float = 0.01
    """lsq and obs: dampening, as a fraction of the mean diagonal of the input's X^T X."""
    objective: str = "output"
    """What the importance and the re-fit measure: the consuming Linear's output error (output), or, where the block
    normalises that output before the residual add (post-norm: Gemma 2 / 3, OLMo 2), the error after the norm to
    first order: the statistics over tokens weighted by 1 / (mean y_t^2 + eps), y_t the Linear's output, and the
    selection's weight rows scaled by the norm's gain."""
    allocation: str = "uniform"
    """MLP widths: uniform (the same in every block; a standard config) or adaptive (FLAP's adaptive structure
    search: each block's channel scores on the unpruned model, standardised within the block, ranked over all
    blocks; the same channels in all are kept, each block's count rounded to ``multiple``; the saved folder needs
    ``llmprune.load``). Heads stay uniform."""

    def __post_init__(self) -> None:
        if not self.structures:
            raise UsageError(f"--structure needs at least one of {', '.join(STRUCTURES)}")
        for s in self.structures:
            if s not in STRUCTURES:
                raise UsageError(f"--structure: unknown structure {s!r}; choose from {', '.join(STRUCTURES)}")
        if self.importance not in IMPORTANCE:
            raise UsageError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.restore not in RESTORES:
            raise UsageError(f"--restore must be one of {', '.join(RESTORES)}, got {self.restore!r}")
        if self.objective not in OBJECTIVES:
            raise UsageError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "post-norm" and self.restore in ("lsq-dense", "bias"):
            raise UsageError(f"--objective post-norm weights the statistics of --restore lsq and of the importance, "
                             f"not --restore {self.restore}; use --restore lsq or none, or drop --objective")
        if self.objective == "post-norm" and self.importance == "magnitude" and self.restore == "none":
            raise UsageError("--objective post-norm weights calibration statistics, and --importance magnitude with "
                             "--restore none reads none; choose another importance or --restore lsq")
        self._check_allocation()
        if not isinstance(self.multiple, int) or self.multiple < 1:
            raise UsageError(f"--width-multiple must be a positive integer, got {self.multiple!r}")
        self._check_amount()

    def _check_allocation(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation == "adaptive" and "mlp" not in self.structures:
            raise UsageError("--allocation adaptive shares the MLP channels out over the blocks; add mlp to --structure")
        if self.allocation == "adaptive" and IMPORTANCE[self.importance].score is None:
            raise UsageError(f"--allocation adaptive ranks channel scores over all blocks, and --importance "
                             f"{self.importance} gives none; use wanda-sp, flap or magnitude")

    def _check_amount(self) -> None:
        if self.remove is None and self.widths is None:
            raise UsageError("--structure needs --remove FRACTION (e.g. --remove 0.2) or --widths FIELD=N,...")
        if self.remove is not None and self.widths is not None:
            raise UsageError("--remove and --widths both say how much to remove; give one of them")
        if self.remove is not None and not 0 < self.remove < 1:
            raise UsageError(f"--remove is the fraction of the decoder's parameters to remove, in (0, 1); got {self.remove}")
        if self.widths is not None:
            given = {WIDTH_FIELDS[k] for k in self.widths}
            if given != set(self.structures):
                raise UsageError(f"--widths must give one width per --structure ({', '.join(self.structures)}): "
                                 f"{', '.join(k for k, v in WIDTH_FIELDS.items() if v in self.structures)}")

    @property
    def needs(self) -> tuple[str, ...]:
        """Statistics of the consuming Linears' inputs (down_proj, o_proj) the run collects."""
        extra = {"none": (), "lsq": ("hessian",), "lsq-dense": ("hessian",), "bias": ("means",)}[self.restore]
        widths = [s for s in self.structures if s != "blocks"]
        return tuple(dict.fromkeys((*IMPORTANCE[self.importance].needs, *extra))) if widths else ()

    @property
    def needs_calibration(self) -> bool:
        return bool(self.needs) or "blocks" in self.structures

    def settings(self) -> dict:
        return {"structures": list(self.structures), "remove": self.remove, "widths": self.widths,
                "importance": self.importance if set(self.structures) != {"blocks"} else None,
                "block_importance": "shortgpt" if "blocks" in self.structures else None,
                "restore": self.restore, "width_multiple": self.multiple,
                **({"restore_damp": self.damp} if self.restore in ("lsq", "lsq-dense") else {}),
                **({"objective": self.objective} if self.objective != "output" else {}),
                "allocation": self.allocation if "mlp" in self.structures else None,
                **({"obs_damp": self.damp, "obs_max_steps": OBS_MAX_STEPS} if self.importance == "obs" else {})}

    @classmethod
    def parse(cls, structure: str, remove: float | None = None, widths: str | dict | None = None,
              importance: str = "wanda-sp", restore: str = "none", multiple: int = 32,
              objective: str = "output", allocation: str = "uniform") -> Structured:
        """From the command line's strings: ``structure`` "mlp,heads", ``widths`` "intermediate_size=1216,..."."""
        names = tuple(dict.fromkeys(s.strip().lower() for s in structure.split(",") if s.strip()))
        parsed = parse_widths(widths) if isinstance(widths, str) else widths
        return cls(names, remove, parsed, importance.lower(), restore.lower(), multiple, objective=objective.lower(),
                   allocation=allocation.lower())


def parse_widths(text: str | None) -> dict | None:
    """'intermediate_size=1216,num_key_value_heads=2' -> {field: int}; None or '' -> None."""
    if text is None or not text.strip():
        return None
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if key not in WIDTH_FIELDS or not value.strip().isdigit():
            raise UsageError(f"--widths takes FIELD=N pairs with FIELD one of {', '.join(WIDTH_FIELDS)}; got {item!r}")
        out[key] = int(value)
    return out


@dataclass(frozen=True)
class Widths:
    """The uniform widths of the pruned model (its config fields)."""

    intermediate_size: int
    num_key_value_heads: int
    num_hidden_layers: int

    def to_dict(self) -> dict:
        return asdict(self)


def plan_widths(shape: Shape, opts: Structured) -> Widths:
    """Uniform widths for ``opts`` on a model of ``shape``.

    With ``remove`` r: blocks alone drop round(r * layers); combined with width structures, blocks and widths
    each take 1 - sqrt(1 - r). The remaining parameters to remove are then shared in every kept block: heads
    drop round(fraction * KV groups) groups (at least one kept; with heads alone, the group count nearest the
    target), and the MLP takes the rest, its width rounded to ``opts.multiple``. Head counts stay ones that divide
    ``hidden_size`` where the model's own count does (``portable_kv_heads``).
    """
    if opts.widths is not None:
        return _explicit(shape, opts)
    r, widths_too = opts.remove, bool(set(opts.structures) - {"blocks"})
    layers = shape.layers
    if "blocks" in opts.structures:
        share = 1 - math.sqrt(1 - r) if widths_too else r
        layers = min(shape.layers, max(1, shape.layers - round(share * shape.layers)))
    per_block = max(0.0, (r * shape.layers - (shape.layers - layers)) * shape.block_params / layers)
    kv, intermediate = shape.kv_heads, shape.intermediate
    if "heads" in opts.structures:
        drop = per_block / shape.block_params * shape.kv_heads if "mlp" in opts.structures \
            else per_block / shape.group_params
        kv = nearest(portable_kv_heads(shape), shape.kv_heads - min(shape.kv_heads - 1, drop))
    if "mlp" in opts.structures:
        channels = (per_block - (shape.kv_heads - kv) * shape.group_params) / shape.channel_params
        intermediate = _round_width(shape.intermediate - channels, opts.multiple, shape.intermediate)
    return Widths(intermediate, kv, layers)


def adaptive_widths(scores: list, keep: int, multiple: int) -> list[int]:
    """Per block, how many of its channels stay when ``keep`` of all blocks' channels stay, chosen by channel
    scores standardised within each block (z = (s - mean) / std) and ranked over all blocks (FLAP's adaptive
    structure); each count then rounded to ``multiple`` (largest remainders first, the total kept), at least one
    multiple and at most the block's width."""
    import torch

    z = [(s.double() - s.double().mean()) / s.double().std().clamp_min(1e-30) for s in scores]
    flat = torch.cat(z)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(-flat, stable=True).indices[:keep]] = True
    raw = [int(part.sum()) for part in chosen.split([len(s) for s in scores])]
    return _round_counts(raw, [len(s) for s in scores], keep, multiple)


def _round_counts(raw: list[int], full: list[int], total: int, multiple: int) -> list[int]:
    """``raw`` counts moved to multiples of ``multiple`` (within [multiple, full]) whose sum is ``total`` where the
    bounds allow: the counts furthest below their raw value grow first, those furthest above shrink first."""
    low = [min(multiple, f) for f in full]
    counts = [min(f, max(lo, multiple * int(r // multiple))) for r, f, lo in zip(raw, full, low)]
    while sum(counts) < total:
        room = [i for i, (c, f) in enumerate(zip(counts, full)) if c < f]
        if not room:
            break
        i = max(room, key=lambda i: (raw[i] - counts[i], -i))
        counts[i] = min(full[i], counts[i] + multiple)
    while sum(counts) > total:
        room = [i for i, (c, lo) in enumerate(zip(counts, low)) if c > lo]
        if not room:
            break
        i = max(room, key=lambda i: (counts[i] - raw[i], i))
        counts[i] = max(low[i], counts[i] - multiple)
    return counts


def portable_kv_heads(shape: Shape) -> list[int]:
    """KV group counts whose query heads divide ``hidden_size``, where the model's own head count does.

    Some transformers versions (5.17, say) refuse to load a config whose ``hidden_size`` is not a multiple of
    ``num_attention_heads``, even with ``head_dim`` written out; a model that meets this keeps meeting it.
    """
    counts = range(1, shape.kv_heads + 1)
    if shape.hidden % shape.heads:
        return list(counts)
    return [g for g in counts if shape.hidden % (g * shape.heads_per_group) == 0]


def nearest(choices: list[int], target: float) -> int:
    """The choice nearest ``target``; between two equally near, the larger (less removed)."""
    return min(choices, key=lambda c: (abs(c - target), -c))


def _round_width(width: float, multiple: int, full: int) -> int:
    """``width`` rounded to the nearest multiple (at least one multiple, at most ``full``)."""
    return min(full, max(min(multiple, full), multiple * round(width / multiple)))


def _explicit(shape: Shape, opts: Structured) -> Widths:
    limits = {"intermediate_size": shape.intermediate, "num_key_value_heads": shape.kv_heads,
              "num_hidden_layers": shape.layers}
    for key, value in opts.widths.items():
        if not 1 <= value <= limits[key]:
            raise UsageError(f"--widths {key}={value}: the model has {limits[key]}; give 1 to {limits[key]}")
    kv = opts.widths.get("num_key_value_heads")
    if kv is not None and kv not in (portable := portable_kv_heads(shape)):
        raise UsageError(f"--widths num_key_value_heads={kv}: {kv * shape.heads_per_group} query heads do not divide "
                         f"hidden_size {shape.hidden}, and some transformers versions refuse such a config; "
                         f"give one of {', '.join(map(str, portable))}")
    return Widths(*(opts.widths.get(k, limits[k]) for k in limits))


@dataclass
class StructuredResult:
    """What a structured run did: widths, kept blocks and channels, parameters before and after."""

    options: Structured
    widths: Widths
    shape: Shape
    """The model's widths before."""
    kept_blocks: list[int]
    block_importance: list[float] | None
    blocks: list[dict]
    """Per kept block: its original index, widths, kept KV groups."""
    params: dict
    """decoder_before, decoder_after (the blocks' parameters), model_before, model_after (tied once)."""
    prune_s: float
    calibration: dict | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def removed_fraction(self) -> float:
        """Fraction of the decoder blocks' parameters removed."""
        return 1 - self.params["decoder_after"] / self.params["decoder_before"]

    @property
    def model_removed_fraction(self) -> float:
        return 1 - self.params["model_after"] / self.params["model_before"]

    def to_report(self) -> dict:
        return {"settings": self.options.settings(), "widths_before": {
                    "intermediate_size": self.shape.intermediate, "num_key_value_heads": self.shape.kv_heads,
                    "num_attention_heads": self.shape.heads, "num_hidden_layers": self.shape.layers,
                    "head_dim": self.shape.head_dim},
                "widths": {**self.widths.to_dict(), "num_attention_heads":
                           self.widths.num_key_value_heads * self.shape.heads_per_group},
                "params": self.params, "removed_fraction": self.removed_fraction,
                "model_removed_fraction": self.model_removed_fraction, "kept_blocks": self.kept_blocks,
                "block_importance": self.block_importance, "blocks": self.blocks}
