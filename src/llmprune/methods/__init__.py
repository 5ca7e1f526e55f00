"""Pruning methods and their modifiers, by name.

A method is a registered class (``register``); a modifier (``MODIFIERS``) is a small options object with an
``apply(method) -> method`` that refuses, with one line, a method it does not fit. Modifiers apply in the
order of ``MODIFIER_ORDER``: the mask is chosen (permuted or not), then refined, then the kept weights updated.
"""

from __future__ import annotations

import dataclasses

from ..errors import UsageError
from ..permute import Permute
from .alps import ALPS
from .dsnot import DSnoT, WithDSnoT, refine_mask
from .magnitude import Magnitude
from .ria import RIA
from .sparsegpt import SparseGPT
from .update import LeastSquares, WithUpdate, lsq_update
from .wanda import Wanda

METHODS = {
    "wanda": Wanda,
    "wanda-variant": lambda: Wanda(variant=True),
    "ria": RIA,
    "sparsegpt": SparseGPT,
    "magnitude": Magnitude,
    "alps": ALPS,
}
MODIFIERS = {"permute": Permute, "dsnot": DSnoT, "lsq": LeastSquares}
"""Modifier name -> its options class (``kind``: permute | refine | update, the flag that names it)."""
MODIFIER_ORDER = ("permute", "refine", "update")


def modifier_names(kind: str) -> tuple[str, ...]:
    """The values of the flag of modifiers of ``kind`` ("refine": none, dsnot; "update": none, lsq)."""
    return ("none", *(name for name, mod in MODIFIERS.items() if mod.kind == kind))


def register(name: str, factory) -> None:
    """Make a method known by ``name`` (``--method name`` too): ``factory()`` returns an instance. A score method
    is a ``base.ScoreMethod`` subclass with a ``score``; ``get_method`` applies the modifiers to it."""
    if name.lower() in METHODS:
        raise ValueError(f"a method named {name!r} is registered already")
    METHODS[name.lower()] = factory


def get_method(name_or_method, *, permute: bool = False, update=None, refine=None, modifiers=()):
    """A method instance from its name (or the instance itself) with its modifiers applied: ``permute`` (N:M masks
    on permuted input channels), ``refine`` ("dsnot" or a ``DSnoT``), ``update`` ("lsq" or a ``LeastSquares``),
    and any other modifier objects in ``modifiers``, in ``MODIFIER_ORDER``."""
    method = name_or_method
    if isinstance(method, str):
        try:
            method = METHODS[method.lower()]()
        except KeyError:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {name_or_method!r}") from None
    chosen = [Permute() if permute else None, as_refine(refine), as_update(update), *modifiers]
    for mod in sorted((m for m in chosen if m is not None), key=lambda m: MODIFIER_ORDER.index(m.kind)):
        method = mod.apply(method)
    return method


def _named(value, kind: str, flag: str):
    """A modifier from its flag's value: None/"none" -> None, a name -> its default options, an object as it is."""
    if value is None or not isinstance(value, str):
        return value
    name, names = value.lower(), modifier_names(kind)
    if name not in names:
        raise UsageError(f"{flag} must be one of {', '.join(names)}, got {value!r}")
    return None if name == "none" else MODIFIERS[name]()


def as_refine(refine):
    """``--refine``: "dsnot" -> ``DSnoT()`` (the paper's defaults)."""
    return _named(refine, "refine", "--refine")


def as_update(update):
    """``--update``: "lsq" -> ``LeastSquares()``."""
    return _named(update, "update", "--update")


def wrapped(method):
    """The method and every method it wraps (``WithUpdate(WithDSnoT(Wanda()))`` -> all three)."""
    while method is not None:
        yield method
        method = getattr(method, "method", None)


def permutable_names() -> list[str]:
    """The registered methods ``--permute`` applies to (score methods with a ``permute`` field)."""
    return [name for name, make in METHODS.items()
            if dataclasses.is_dataclass(m := make()) and any(f.name == "permute" for f in dataclasses.fields(m))]


def score_method_names() -> list[str]:
    """The registered methods that prune by a score (the ones --refine applies to)."""
    return [name for name, make in METHODS.items() if hasattr(make(), "score")]


__all__ = ["ALPS", "DSnoT", "LeastSquares", "METHODS", "MODIFIERS", "Magnitude", "Permute", "RIA", "SparseGPT", "Wanda",
           "WithDSnoT", "WithUpdate", "as_refine", "as_update", "get_method", "lsq_update", "modifier_names", "permutable_names",
           "refine_mask", "register", "score_method_names", "wrapped"]
