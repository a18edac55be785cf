"""``coord_check``: record a model's first steps at several widths, for muP's coordinate check.

It is a gradscope recording repeated over widths: one run per width, each tagged
``meta["coord_check"]``, so ``gradscope report`` draws each layer's activation RMS against width
and ``diagnose`` flags layers that grow with it (``analysis.coord``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.analysis.coord import DEFAULT_MAX_SLOPE, coord_table, growing_layers, width_slopes
from gradscope.analysis.findings import Finding, diagnose
from gradscope.lab.models.registry import entry
from gradscope.lab.train import record_steps
from gradscope.store import Run, load_run


@dataclass
class CoordCheck:
    """What a coordinate check recorded and found."""

    runs: list[Run]  # one per width, in the order given
    table: pd.DataFrame  # group, width, step, layer, rel_depth, act_rms
    slopes: pd.DataFrame  # group, step, layer, rel_depth, slope (of log act_rms on log width), widths
    growing: list[dict[str, Any]]  # the layers flagged (``analysis.coord.growing_layers``)
    findings: list[Finding]


def flat_loss(output: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy over every position: logits ``[..., classes]``, integer targets ``[...]``."""
    return F.cross_entropy(output.flatten(0, -2), target.flatten())


def coord_check(factory: Callable[[int], nn.Module], widths: Sequence[int],
                batch_fn: Callable[[int], tuple[Any, Tensor]], steps: int = 5, *,
                out: str | os.PathLike[str] = "runs/coord-check", name: str = "model",
                optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
                loss_fn: Callable[[Any, Tensor], Tensor] = flat_loss, seed: int = 0, overwrite: bool = False,
                max_slope: float = DEFAULT_MAX_SLOPE) -> CoordCheck:
    """Train ``factory(width)`` for ``steps`` steps at each width, recording every step.

    ``batch_fn(step)`` gives ``(inputs, targets)``, the same at every width; ``optimizer(params)``
    defaults to Adam at lr 1e-3 (the setting muP's coordinate check is known for). Runs go to
    ``out/<name>-w<width>``.
    """
    widths = [int(w) for w in widths]
    if len(set(widths)) < 2 or min(widths) < 1:
        raise ValueError(f"coord_check: give at least two different positive widths, got {widths}")
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"coord_check: steps must be an integer >= 2 (step 0 is the initialisation), got {steps!r}")
    make_optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
    paths = [Path(out) / f"{name}-w{w}" for w in widths]
    for width, path in zip(widths, paths):
        torch.manual_seed(seed)
        model = factory(width)
        record_steps(model, path, make_optimizer(model.parameters()), batch_fn, loss_fn, steps, overwrite=overwrite,
                     meta={"coord_check": {"group": name, "width": width, "steps": steps}})
    runs = [load_run(path) for path in paths]
    table = coord_table(runs)
    return CoordCheck(runs, table, width_slopes(table), growing_layers(runs, max_slope), diagnose(runs))


def width_overrides(model_name: str, width: int) -> dict[str, Any]:
    """The settings that make reference model ``model_name`` ``width`` wide (MLPs: ``width``;
    Transformers: ``d_model``, with ``d_ff`` 4x it)."""
    defaults = entry(model_name).defaults
    if "width" in defaults:
        return {"width": width}
    if "d_model" in defaults:
        heads = defaults.get("heads", 1)
        if width % heads:
            raise ValueError(f"{model_name}: width {width} is not a multiple of its {heads} attention heads")
        return {"d_model": width, "d_ff": 4 * width}
    raise ValueError(f"{model_name} has no width setting; coord-check takes the mlp_* and transformer_* models")
