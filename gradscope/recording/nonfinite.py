"""Where a NaN or inf started: the first watched layer of a pass whose output or output gradient
was non-finite, found at a flush in the statistics already recorded.

A NaN or inf anywhere in a tensor makes its mean (and its absolute maximum, or its squared norm)
non-finite, so the statistics each recorded step already holds tell which layers saw one: no
``isfinite`` pass of its own, nothing on the device beyond what is measured anyway. A value
spreads forward to every later layer and backward to every earlier one, so the origin is the
non-finite output earliest in execution order, and in the backward pass the layer latest in it
whose output gradient arrived non-finite, or whose own backward made its parameters' gradient
non-finite from a finite output gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from gradscope.recording.layers import ExecutionOrder, Layer
from gradscope.recording.user_warnings import warn_user
from gradscope.store.schema import ACT_ABSMAX, ACT_MEAN, ACT_VAR, EVAL, GRAD_OUT_SS, GRAD_SS, TRAIN, HostCounts

#: What ``watch(on_nonfinite=...)`` may do when a flush finds one.
ACTIONS = ("warn", "raise", "ignore")

def checked_action(action: str) -> str:
    if action not in ACTIONS:
        raise ValueError(f"gradscope.watch: on_nonfinite must be one of {', '.join(ACTIONS)}, got {action!r}")
    return action


_OUTPUT = ((ACT_MEAN, "act_mean"), (ACT_ABSMAX, "act_absmax"), (ACT_VAR, "act_var"))


@dataclass(frozen=True)
class NonFinite:
    """The first non-finite layer of one pass of one recorded step."""

    step: int
    phase: str  # "forward", "backward" or "eval forward"
    layer: str
    type: str
    statistic: str  # the statistic that shows it (act_mean, act_absmax, act_var, grad_out_norm)
    index: int  # the layer's position in execution order

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def words(self) -> str:
        return (f"step {self.step}, {self.phase} pass: {self.layer} ({self.type}) is the first watched layer whose "
                f"{self.what()} held a NaN or inf ({self.statistic} non-finite)")

    def what(self) -> str:
        return {"grad_out_norm": "output gradient", "grad_norm": "parameters' gradient"}.get(self.statistic, "output")


def first_nonfinite(steps: list[int], layer_host: np.ndarray, counts: HostCounts, order: list[int],
                    layers: list[Layer], backward: bool = True) -> list[NonFinite]:
    """Every pass's first non-finite layer in the earliest recorded step that has one (empty if none).

    ``layer_host``: the flushed ``[slots, phases, layers, width]`` accumulators, ``order``: the
    layers' rows in order of first execution. ``backward=False`` skips output gradients (a
    GradScaler makes inf gradients on purpose, then skips the step).
    """
    position = np.full(len(layers), len(layers), np.int64)  # a row that never ran: last
    position[order] = np.arange(len(order))
    for slot, step in enumerate(steps):
        found = []
        for phase, name in ((TRAIN, "forward"), (EVAL, "eval forward")):
            values = layer_host[slot, phase]
            seen = counts.act_n[slot, phase] > 0
            bad = seen & ~np.isfinite(values[:, [c for c, _ in _OUTPUT]]).all(axis=1)
            if bad.any():
                row = int(np.flatnonzero(bad)[np.argmin(position[bad])])
                stat = next(n for c, n in _OUTPUT if not np.isfinite(values[row, c]))
                found.append(_event(step, name, layers[row], stat, position[row]))
        if backward:
            arrived = (counts.grad_n[slot] > 0) & ~np.isfinite(layer_host[slot, TRAIN, :, GRAD_OUT_SS])
            ran = position < len(order)  # rows of parameters no module owns have no probe, no place in a pass
            made = ran & counts.grad_rows[slot] & ~np.isfinite(layer_host[slot, TRAIN, :, GRAD_SS])
            bad = arrived | made
            if bad.any():
                row = int(np.flatnonzero(bad)[np.argmax(position[bad])])
                stat = "grad_out_norm" if arrived[row] else "grad_norm"  # else its own backward made it
                found.append(_event(step, "backward", layers[row], stat, position[row]))
        if found:
            return found
    return []


def _event(step: int, phase: str, layer: Layer, statistic: str, index: Any) -> NonFinite:
    return NonFinite(int(step), phase, layer.name, layer.type, statistic, int(index))


class NonFiniteCheck:
    """Looks at each flush's steps until the first non-finite layers are found; then reports once."""

    def __init__(self, action: str, layers: list[Layer], order: ExecutionOrder, backward: bool) -> None:
        self.action, self.layers, self.order, self.backward = checked_action(action), layers, order, backward
        self.found: list[NonFinite] = []  # kept in meta.json's nonfinite

    def check(self, steps: list[int], layer_host: Any, counts: HostCounts, ready: Any) -> list[NonFinite]:
        """The flushed steps' first non-finite layers, the first time there are any. On CUDA this
        waits for the flush's copies (once per flush, as a flush of several processes does)."""
        if self.found or self.action == "ignore" or not steps:
            return []
        if ready is not None:
            ready.synchronize()
        host = layer_host.numpy() if hasattr(layer_host, "numpy") else np.asarray(layer_host)
        self.found = first_nonfinite(steps, host, counts, self.order.rows, self.layers, self.backward)
        return self.found

    def report(self, path: Any, may_raise: bool) -> None:
        """Warn, or raise ``FloatingPointError`` (never while closing), naming what was found."""
        message = (f"gradscope: first NaN or inf in {path}: " + "; ".join(e.words() for e in self.found)
                   + " (recorded in meta.json's nonfinite)")
        if self.action == "raise" and may_raise:
            raise FloatingPointError(message)
        warn_user(message)
