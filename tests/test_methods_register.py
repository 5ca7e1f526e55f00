"""A new score method is one class and one ``register`` line: the command, the modifiers and the report take it.

The example, "wanda-squared" (|W| * ||X||^2), lives in this file alone; nothing in src/ names it."""

from dataclasses import dataclass

import pytest
import torch

from llmprune import UsageError, api, methods
from llmprune.methods.base import ScoreMethod

from .conftest import random_tokens, tiny_model


@dataclass(frozen=True)
class WandaSquared(ScoreMethod):
    name = "wanda-squared"
    needs = ("norms",)
    permute: bool = False

    def score(self, weight, stats) -> torch.Tensor:
        return weight.abs().float() * stats["norms"].mean_sq.unsqueeze(0)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(methods.METHODS, "wanda-squared", WandaSquared)  # undone after the test
    yield
    assert "wanda-squared" in methods.METHODS


def test_register_refuses_a_second_method_of_one_name():
    with pytest.raises(ValueError, match="'wanda' is registered already"):
        methods.register("wanda", WandaSquared)


def test_a_registered_score_method_prunes_with_every_modifier(registered):
    assert "wanda-squared" in methods.score_method_names()
    model, tokens = tiny_model("llama"), random_tokens(4, 16)
    result = api.prune(model, method="wanda-squared", pattern="2:4", calib_tokens=tokens, device="cpu",
                       progress=False, permute=True, refine="dsnot", update="lsq")
    assert result.method == "wanda-squared+dsnot+lsq" and result.method_settings["permute"] is True
    for layer in result.layers:  # exactly 2 of every 4 pruned (in the permuted order the mask was chosen in)
        rows, cols = layer.shape
        assert layer.zeros == rows * cols // 2


def test_a_registered_method_is_named_in_the_errors(registered):
    with pytest.raises(UsageError, match=r"--method must be one of .*wanda-squared"):
        methods.get_method("nope")
    with pytest.raises(UsageError, match=r"score method \(wanda, wanda-variant, ria, magnitude, wanda-squared\)"):
        methods.get_method("sparsegpt", refine="dsnot")


@dataclass(frozen=True)
class RoundKept:
    """An example update modifier: the kept weights rounded to bfloat16 after the mask."""

    kind = "update"

    def apply(self, method):
        return _Rounded(method)


@dataclass(frozen=True)
class _Rounded:
    method: object

    @property
    def name(self):
        return f"{self.method.name}+round"

    @property
    def needs(self):
        return self.method.needs

    def prune(self, weight, stats, pattern):
        new, keep = self.method.prune(weight, stats, pattern)
        return new.to(torch.bfloat16).to(new.dtype), keep

    def settings(self):
        return {**self.method.settings(), "update": "round"}


def test_a_registered_modifier_is_one_class_and_one_line(monkeypatch):
    monkeypatch.setitem(methods.MODIFIERS, "round", RoundKept)
    assert methods.modifier_names("update") == ("none", "lsq", "round")
    model, tokens = tiny_model("llama"), random_tokens(4, 16)
    result = api.prune(model, method="wanda", calib_tokens=tokens, device="cpu", progress=False, update="round")
    assert result.method == "wanda+round" and result.method_settings["update"] == "round"
    weight = model.model.layers[0].mlp.up_proj.weight
    assert torch.equal(weight, weight.to(torch.bfloat16).float()) and (weight == 0).float().mean().item() == 0.5
    with pytest.raises(UsageError, match=r"--update must be one of none, lsq, round, got 'nope'"):
        methods.get_method("wanda", update="nope")


def test_every_registered_method_and_modifier_fits_its_protocol():
    from llmprune.methods.base import Method, Modifier

    for name in methods.METHODS:
        assert isinstance(methods.get_method(name), Method), name
    for name, make in methods.MODIFIERS.items():
        assert isinstance(make(), Modifier), name
    assert isinstance(methods.get_method("wanda", permute=True, refine="dsnot", update="lsq"), Method)
