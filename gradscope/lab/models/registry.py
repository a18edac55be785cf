"""A registry of reference models, in the spirit of timm: register, list, create by name."""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

#: What a model's forward takes and predicts: images -> class, tokens -> class,
#: tokens -> next token at every position, (source, target) tokens -> target tokens.
INPUT_KINDS = ("image", "tokens", "lm", "seq2seq")


@dataclass(frozen=True)
class ModelEntry:
    """A registered reference model: how to build it and what it eats."""

    name: str
    factory: Callable[..., nn.Module]
    family: str  # "resnet", "plain", "preresnet", "mlp", "transformer"
    input_kind: str  # one of INPUT_KINDS
    defaults: dict[str, Any] = field(default_factory=dict)  # the factory's keyword defaults
    description: str = ""


class UnknownModelError(KeyError):
    """No registered model has that name; the message lists the closest ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str | None = None, *, family: str, input_kind: str, description: str = "",
    defaults: dict[str, Any] | None = None,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a factory ``(**config) -> nn.Module`` under ``name`` (default: its name).

    The configuration a user may override is the factory's keyword defaults, or ``defaults``.
    """
    if input_kind not in INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {input_kind!r}")

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or factory.__name__
        if key in _REGISTRY:
            raise ValueError(f"model {key!r} is already registered")
        config = dict(defaults) if defaults is not None else {
            p.name: p.default for p in inspect.signature(factory).parameters.values()
            if p.default is not inspect.Parameter.empty}
        doc = description or (inspect.getdoc(factory) or "").split("\n")[0]
        _REGISTRY[key] = ModelEntry(key, factory, family, input_kind, config, doc)
        return factory

    return wrap


def names(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob pattern, in natural order (resnet20 before resnet110)."""
    return sorted((n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern)), key=_natural_key)


def entry(name: str) -> ModelEntry:
    """The registry entry for ``name``; raises UnknownModelError with suggestions."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(names())}"
        raise UnknownModelError(f"unknown model {name!r}{hint}") from None


def create(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model, with keyword overrides of its configuration.

    The model carries ``gradscope_name`` and ``gradscope_config`` so a recorded run can say
    exactly what was trained.
    """
    e = entry(name)
    unknown = set(overrides) - set(e.defaults)
    if unknown:
        raise TypeError(f"{name} does not take {', '.join(sorted(unknown))}; "
                        f"it takes {', '.join(sorted(e.defaults))}")
    config = {**e.defaults, **overrides}
    for key, value in overrides.items():  # sizes and counts must stay positive
        default = e.defaults[key]
        if isinstance(default, int) and not isinstance(default, bool) and default > 0:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: {key} must be a positive integer, got {value!r}")
    try:
        model = e.factory(**config)
    except (ValueError, TypeError, ZeroDivisionError, RuntimeError) as exc:
        raise ValueError(f"cannot build {name} with {overrides}: {exc}") from None
    model.gradscope_name = name
    model.gradscope_config = _json_config(config)
    return model


def example_input(name: str, batch: int = 2, seed: int = 0, **overrides: Any) -> tuple[Any, torch.Tensor]:
    """A random input for ``create(name, **overrides)`` and integer targets for its loss.

    Outputs are logits ``[..., classes]`` and targets ``[...]``, so one loss fits every model:
    ``F.cross_entropy(out.flatten(0, -2), target.flatten())``.
    """
    e = entry(name)
    cfg = {**e.defaults, **overrides}
    g = torch.Generator().manual_seed(seed)

    def ints(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(0, high, shape, generator=g)

    if e.input_kind == "image":
        size = cfg["input_size"]
        return torch.randn(batch, cfg["in_channels"], size, size, generator=g), ints(cfg["num_classes"], batch)
    vocab, length = cfg["vocab_size"], cfg["seq_len"]
    if e.input_kind == "tokens":
        return ints(vocab, batch, length), ints(cfg["num_classes"], batch)
    if e.input_kind == "lm":
        return ints(vocab, batch, length), ints(vocab, batch, length)
    return (ints(vocab, batch, length), ints(vocab, batch, length)), ints(vocab, batch, length)


def _json_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else repr(v) for k, v in config.items()}


def _natural_key(name: str) -> tuple[Any, ...]:
    """Sort resnet20 before resnet110."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))
