"""Pruning methods by name."""

from __future__ import annotations

import dataclasses

from ..config import DSnoT
from ..errors import UsageError
from .dsnot import WithDSnoT, refine_mask
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


def register(name: str, factory) -> None:
    """Make a method known by ``name`` (``--method name`` too): ``factory()`` returns an instance. A score method
    is a ``base.ScoreMethod`` subclass with a ``score``; ``get_method`` applies the modifiers to it."""
    if name.lower() in METHODS:
        raise ValueError(f"a method named {name!r} is registered already")
    METHODS[name.lower()] = factory


def _permutable() -> list[str]:
    return [name for name, make in METHODS.items()
            if dataclasses.is_dataclass(m := make()) and any(f.name == "permute" for f in dataclasses.fields(m))]


def score_method_names() -> list[str]:
    """The registered methods that prune by a score (the ones --permute and --refine apply to)."""
    return [name for name, make in METHODS.items() if hasattr(make(), "score")]
REFINES = ("none", "dsnot")


def get_method(name_or_method, *, permute: bool = False, update: str | None = None, refine=None):
    """A method instance from its name (or the instance itself), with channel permutation for N:M
    (score methods only), the mask refined by DSnoT (``refine="dsnot"`` or a ``config.DSnoT``; score
    methods only) and then a weight update after the mask (``update="lsq"``) if asked."""
    method = name_or_method
    if isinstance(method, str):
        try:
            method = METHODS[method.lower()]()
        except KeyError:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {name_or_method!r}") from None
    if permute:
        if not (dataclasses.is_dataclass(method) and any(f.name == "permute" for f in dataclasses.fields(method))):
            raise UsageError(f"--permute works with the score methods ({', '.join(_permutable())}), not {method.name}")
        method = dataclasses.replace(method, permute=True)
    refine = as_refine(refine)
    if refine is not None and not isinstance(method, WithDSnoT):
        if not hasattr(method, "score"):
            raise UsageError(f"--refine dsnot refines the mask of a score method ({', '.join(score_method_names())}); "
                             f"{method.name} changes the weights as it masks: drop --refine")
        method = WithDSnoT(method, refine.cycles, refine.threshold)
    update = (update or "none").lower()
    if update not in UPDATES:
        raise UsageError(f"--update must be one of {', '.join(UPDATES)}, got {update!r}")
    if update == "lsq" and not isinstance(method, WithUpdate):
        method = WithUpdate(method)
    return method


def wrapped(method):
    """The method and every method it wraps (``WithUpdate(WithDSnoT(Wanda()))`` -> all three)."""
    while method is not None:
        yield method
        method = getattr(method, "method", None)


def as_refine(refine) -> DSnoT | None:
    """``None``/"none" -> None, "dsnot" -> ``DSnoT()`` (the paper's defaults), a ``DSnoT`` as it is."""
    if refine is None or isinstance(refine, DSnoT):
        return refine
    name = str(refine).lower()
    if name not in REFINES:
        raise UsageError(f"--refine must be one of {', '.join(REFINES)}, got {refine!r}")
    return DSnoT() if name == "dsnot" else None


__all__ = ["METHODS", "register", "score_method_names", "RIA", "Magnitude", "SparseGPT", "Wanda", "WithDSnoT", "WithUpdate", "as_refine", "get_method",
           "lsq_update", "refine_mask", "wrapped"]
