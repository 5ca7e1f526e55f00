"""Typed options of a pruning run, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UsageError


@dataclass(frozen=True)
class Calibration:
    """Where the calibration windows come from."""

    source: str = "c4"
    """'c4', 'wikitext2', or a path to a .txt / .jsonl (``text`` field) file."""
    nsamples: int = 128
    """Number of calibration windows."""
    seqlen: int = 2048
    """Tokens per window; never taken from the model's maximum context."""
    seed: int = 0
    """Seed of the window sampler."""

    def __post_init__(self) -> None:
        if not isinstance(self.nsamples, int) or self.nsamples < 1:
            raise UsageError(f"--nsamples must be a positive integer, got {self.nsamples!r}")
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise UsageError(f"--seqlen must be an integer >= 2, got {self.seqlen!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EvalSettings:
    """Perplexity evaluation: which sets, window length, how many windows."""

    sets: tuple[str, ...] = ("wikitext2",)
    seqlen: int = 2048
    max_windows: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        from .data import EVAL_SETS

        for name in self.sets:
            if name not in EVAL_SETS:
                raise UsageError(f"--eval: unknown set {name!r}; choose from {', '.join(EVAL_SETS)}")
        if self.seqlen < 2:
            raise UsageError(f"--eval-seqlen must be >= 2, got {self.seqlen}")
        if self.max_windows is not None and self.max_windows < 1:
            raise UsageError(f"--max-eval-windows must be >= 1, got {self.max_windows}")


def parse_sets(text: str | None) -> tuple[str, ...]:
    return tuple(s.strip().lower() for s in (text or "").split(",") if s.strip())
