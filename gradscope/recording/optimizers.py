"""The optimizer behind a framework's wrapper, whose step hooks mark gradscope's steps.

Trainers hand out wrappers: accelerate's ``AcceleratedOptimizer`` (an ``Optimizer`` subclass
that never ran ``Optimizer.__init__``, so it has no hook registries) and Lightning's
``LightningOptimizer``. Each calls its wrapped optimizer's ``step()``, so hooks on the innermost
one fire once per real update, and not at all when an AMP scaler skips it.
"""

from __future__ import annotations

from typing import Any

import torch

#: Attributes wrappers keep their optimizer under: accelerate's, then Lightning's.
_WRAPPED = ("optimizer", "_optimizer")


def unwrap_optimizer(optimizer: Any) -> tuple[torch.optim.Optimizer | None, list[str]]:
    """The innermost optimizer with its own step hooks, and the wrapper classes peeled off."""
    if optimizer is None:
        return None, []
    wrappers: list[str] = []
    current = optimizer
    for _ in range(8):  # wrappers of wrappers, but never a cycle
        inner = next((getattr(current, name) for name in _WRAPPED
                      if hasattr(getattr(current, name, None), "param_groups")), None)
        if inner is not None and inner is not current:  # Lightning's also subclasses the optimizer's class
            wrappers.append(type(current).__name__)
            current = inner
        elif isinstance(current, torch.optim.Optimizer) and hasattr(current, "_optimizer_step_pre_hooks"):
            return current, wrappers
        else:
            break
    raise TypeError(f"gradscope.watch: optimizer= must be a torch.optim.Optimizer or a wrapper holding one as "
                    f".optimizer or ._optimizer (accelerate, Lightning); got {type(optimizer).__name__}")


def has_closure(args: Any, kwargs: Any) -> bool:
    """Whether an ``optimizer.step`` hook's call was given a closure (``args[0]`` is the optimizer):
    the closure runs the forward and backward inside the step (LBFGS, SAM, Lightning)."""
    return callable(kwargs.get("closure", args[1] if len(args) > 1 else None))
