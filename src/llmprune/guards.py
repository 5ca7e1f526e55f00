"""Numerical guards: NaN/Inf found where it first appears, named, with advice; warnings kept for the report."""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterable, Iterator

import torch

from .errors import UsageError


class NumericalError(UsageError):
    """NaN/Inf in activations, statistics or weights, or a matrix that cannot be factorised."""


class NumericalWarning(UserWarning):
    """A numerical fix-up that changed the computation (e.g. more dampening); recorded in the report."""


def advice(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "float16 overflows on models trained in bfloat16; run with --dtype bfloat16 or --dtype float32"
    if dtype == torch.bfloat16:
        return "run with --dtype float32"
    return "the model produces them even in float32; check its weights (e.g. --eval on the dense model)"


def check_finite(tensors: Iterable[torch.Tensor], where: str, dtype: torch.dtype) -> None:
    """Raise ``NumericalError`` naming ``where`` if any tensor holds NaN or Inf."""
    for t in tensors:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise NumericalError(f"{kind} in {where} (dtype {str(dtype).replace('torch.', '')}); {advice(dtype)}")


def statistic_tensors(stats: dict) -> Iterator[torch.Tensor]:
    """Every tensor held by a layer's statistic accumulators."""
    for acc in stats.values():
        for value in vars(acc).values():
            if isinstance(value, torch.Tensor):
                yield value


@contextlib.contextmanager
def record_numerical_warnings() -> Iterator[list[str]]:
    """Collect ``NumericalWarning`` messages raised inside; other warnings pass through unchanged."""
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NumericalWarning)
        try:
            yield messages
        finally:
            others = []
            for w in caught:
                if issubclass(w.category, NumericalWarning):
                    messages.append(str(w.message))
                else:
                    others.append(w)
    for w in others:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
