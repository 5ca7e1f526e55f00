"""Pruning methods by name."""

from __future__ import annotations

import dataclasses

from ..errors import UsageError
from .magnitude import Magnitude
from .ria import RIA
from .sparsegpt import SparseGPT
from .update import WithUpdate, lsq_update
from .wanda import Wanda

METHODS = {
    "wanda": Wanda,
    "wanda-variant": lambda: Wanda(variant=True),
    "ria": RIA,
    "sparsegpt": SparseGPT,
    "magnitude": Magnitude,
}
UPDATES = ("none", "lsq")


def get_method(name_or_method, *, permute: bool = False, update: str | None = None):
    """A method instance from its name (or the instance itself), with channel permutation for N:M
    (score methods only) and a weight update after the mask (``update="lsq"``) if asked."""
    method = name_or_method
    if isinstance(method, str):
        try:
            method = METHODS[method.lower()]()
        except KeyError:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {name_or_method!r}") from None
    if permute:
        if not (dataclasses.is_dataclass(method) and any(f.name == "permute" for f in dataclasses.fields(method))):
            raise UsageError(f"--permute works with the score methods (wanda, ria, magnitude), not {method.name}")
        method = dataclasses.replace(method, permute=True)
    update = (update or "none").lower()
    if update not in UPDATES:
        raise UsageError(f"--update must be one of {', '.join(UPDATES)}, got {update!r}")
    if update == "lsq" and not isinstance(method, WithUpdate):
        method = WithUpdate(method)
    return method


__all__ = ["METHODS", "RIA", "Magnitude", "SparseGPT", "Wanda", "WithUpdate", "get_method", "lsq_update"]
