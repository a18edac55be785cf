"""``assert_healthy``: gradscope's findings as a pytest assertion about a user's own model.

It trains a copy of the model for a few steps with gradscope attached, in a temporary directory,
and fails with the findings listed, so a change of architecture or initialisation that makes
gradients vanish fails the test suite that day rather than a training run days later.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.analysis.findings import Finding, at_or_above, diagnose
from gradscope.lab.train import record_steps
from gradscope.store import load_run


def assert_healthy(model: nn.Module, batch_fn: Callable[[int], tuple[Any, Tensor]], steps: int = 20, *,
                   loss_fn: Callable[[Any, Tensor], Tensor] = F.cross_entropy,
                   optimizer: Callable[[Any], torch.optim.Optimizer] | None = None, fail_on: str = "warning",
                   every: int = 1, **watch_kwargs: Any) -> list[Finding]:
    """Train a copy of ``model`` for ``steps`` steps and raise ``AssertionError`` listing every
    finding at ``fail_on`` severity or above; return all findings otherwise.

    ``batch_fn(step)`` gives ``(inputs, targets)``; ``loss_fn(model(inputs), targets)`` the loss;
    ``optimizer(params)`` the optimizer (default SGD, lr 0.1). ``model`` itself is not trained.
    """
    at_or_above([], fail_on)  # a bad level fails before any training
    trained = copy.deepcopy(model)
    opt = optimizer(trained.parameters()) if optimizer is not None else torch.optim.SGD(trained.parameters(), lr=0.1)
    with tempfile.TemporaryDirectory(prefix="gradscope-health-") as tmp:
        path = Path(tmp) / type(model).__name__.lower()
        record_steps(trained, path, opt, batch_fn, loss_fn, steps, every=every, **watch_kwargs)
        findings = diagnose(load_run(path))
    failing = at_or_above(findings, fail_on)
    if failing:
        listed = "\n".join(f"  {f}" for f in failing)
        raise AssertionError(f"gradscope found {len(failing)} problem(s) at {fail_on} or above in "
                             f"{type(model).__name__} after {steps} steps:\n{listed}")
    return findings
