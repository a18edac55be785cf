"""Lesion study (Veit et al. 2016): the model with one block replaced by the identity, block by block.

Deleting a block from a trained residual network barely changes its error, deleting a layer of
a plain network destroys it: a residual network behaves like an ensemble of many paths of
different lengths, none of which it depends on alone. Here a block is "deleted" by a forward
hook that returns its input, which is possible wherever the block keeps the shape (a stage's
downsampling block does not; its row says so).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.analyses._model_state import untouched
from gradscope.recording.blocks import select_blocks
from gradscope.recording.layers import ModuleFilter

LossFn = Callable[[Tensor, Tensor], Tensor]


def lesion(model: nn.Module, inputs: Any, targets: Tensor, *, loss_fn: LossFn | None = None,
           blocks: ModuleFilter | None = None, step: int = 0) -> pd.DataFrame:
    """Loss and accuracy of ``model`` on one batch with each block in turn replaced by the identity.

    ``blocks`` picks them as ``watch(blocks=...)`` does (default: the model's declared blocks,
    else repeated sibling modules). ``loss_fn(output, targets)`` defaults to cross-entropy over
    the last dimension (targets of -100 ignored); accuracy is the argmax's, NaN for other outputs.
    The model runs in eval mode and is left as it was. One row per block, in execution order.
    """
    chosen = select_blocks(model, blocks)
    if not chosen:
        raise ValueError(f"lesion: {type(model).__name__} has no blocks to remove; name them with blocks=")
    loss_fn = loss_fn or _cross_entropy
    rows = []
    with untouched(model, train=False), torch.no_grad():
        order, keeps_shape = _execution_order(model, inputs, [m for _, m, _ in chosen])
        base_loss, base_acc = _evaluate(model, inputs, targets, loss_fn)
        for block, module, _ in chosen:
            row = {"step": step, "block": block.name, "residual": bool(block.residual),
                   "order": order.get(id(module), -1), "base_loss": base_loss, "base_accuracy": base_acc,
                   "loss": np.nan, "accuracy": np.nan, "loss_increase": np.nan, "reason": None}
            shape = keeps_shape.get(id(module))
            if shape is None:
                row["reason"] = "did not run on this batch"
            elif not shape:
                row["reason"] = "changes the shape of its input: no identity to put in its place"
            else:
                handle = module.register_forward_hook(_identity)
                try:
                    loss, acc = _evaluate(model, inputs, targets, loss_fn)
                finally:
                    handle.remove()
                row.update(loss=loss, accuracy=acc, loss_increase=loss - base_loss)
            rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values("order", kind="stable", ignore_index=True)


def _identity(module: nn.Module, args: Any, output: Any) -> Any:
    """The block's input in place of its output (of the first output, where it returns several:
    a Hugging Face block returns the hidden state with its attention cache)."""
    if isinstance(output, tuple):
        return (args[0], *output[1:])
    return args[0]


def _execution_order(model: nn.Module, inputs: Any, modules: list[nn.Module]
                     ) -> tuple[dict[int, int], dict[int, bool]]:
    """Each block's place in one forward (by first call), and whether its output keeps its input's shape."""
    order: dict[int, int] = {}
    keeps_shape: dict[int, bool] = {}

    def note(module: nn.Module, args: Any, output: Any) -> None:
        if id(module) not in order:
            order[id(module)] = len(order)
            x = args[0] if args else None
            y = output[0] if isinstance(output, tuple) and output else output
            keeps_shape[id(module)] = isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape

    handles = [m.register_forward_hook(note) for m in modules]
    try:
        _forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return order, keeps_shape


def _forward(model: nn.Module, inputs: Any) -> Tensor:
    out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _evaluate(model: nn.Module, inputs: Any, targets: Tensor, loss_fn: LossFn) -> tuple[float, float]:
    out = _forward(model, inputs)
    loss = float(loss_fn(out, targets))  # once per block, outside any training step
    acc = float("nan")
    if out.dim() >= 2 and out.shape[:-1] == targets.shape and not targets.is_floating_point():
        valid = targets != -100
        acc = float(((out.argmax(-1) == targets) & valid).sum() / valid.sum().clamp_min(1))
    return loss, acc


def _cross_entropy(out: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(out.float().reshape(-1, out.shape[-1]), targets.reshape(-1), ignore_index=-100)
