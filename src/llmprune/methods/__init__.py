"""Pruning methods by name."""

from __future__ import annotations

from ..errors import UsageError
from .magnitude import Magnitude
from .sparsegpt import SparseGPT
from .wanda import Wanda

METHODS = {"wanda": Wanda, "sparsegpt": SparseGPT, "magnitude": Magnitude}


def get_method(name_or_method):
    """A method instance from its name (or the instance itself)."""
    if not isinstance(name_or_method, str):
        return name_or_method
    try:
        return METHODS[name_or_method.lower()]()
    except KeyError:
        raise UsageError(
            f"--method must be one of {', '.join(METHODS)}, got {name_or_method!r}"
        ) from None


__all__ = ["METHODS", "Magnitude", "SparseGPT", "Wanda", "get_method"]
