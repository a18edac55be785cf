"""Checks that no hook is left on a module or optimizer (after Captum's test idea)."""

from __future__ import annotations

from typing import Any

from torch import nn

_MODULE_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
    "_backward_hooks", "_backward_pre_hooks",
)
_OPTIMIZER_HOOK_DICTS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")


def hook_counts(model: nn.Module, optimizer: Any = None) -> dict[str, int]:
    """Number of hooks per ``"module_name.hook_dict"`` (and parameter tensor hooks), zeros left out."""
    counts: dict[str, int] = {}
    for name, module in model.named_modules():
        for attr in _MODULE_HOOK_DICTS:
            n = len(getattr(module, attr, {}) or {})
            if n:
                counts[f"{name or '<root>'}.{attr}"] = n
        for pname, p in module.named_parameters(recurse=False):
            n = len(getattr(p, "_backward_hooks", None) or {})
            if n:
                counts[f"{name or '<root>'}.{pname}._backward_hooks"] = n
    if optimizer is not None:
        for attr in _OPTIMIZER_HOOK_DICTS:
            n = len(getattr(optimizer, attr, {}) or {})
            if n:
                counts[f"<optimizer>.{attr}"] = n
    return counts


def assert_no_hooks(model: nn.Module, optimizer: Any = None) -> None:
    """Fail with the offending modules if any hook is still registered."""
    left = hook_counts(model, optimizer)
    if left:
        raise AssertionError(f"hooks left behind: {left}")
