"""The step clock: which step training is in, whether it is recorded, and when it ends.

Step boundaries: with ``optimizer=`` the optimizer's own step hooks mark them (the pre-hook sees
the final gradients, after clipping and AMP unscaling, just before the update); without it the
user calls ``Recorder.step()`` after ``backward()``. Gradient accumulation therefore merges
micro-batches into one recorded step, as it should. A ``GradScaler`` that finds inf/NaN skips
``optimizer.step()``, so the optimizer's hooks never mark that step; its ``scaler.update()``
still runs, in Python even where the model is compiled (``amp.ScalerUpdateHook``), and ends it
(``skipped_by_scaler``). Everything here is plain Python, so hooks test it without touching a tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class StepClock:
    """Step numbers and the ``every`` schedule: steps 0, every, 2*every, ... are recorded."""

    __slots__ = ("every", "step", "recording", "grad_forward_seen", "held", "_watch_scaler",
                 "compiled_forward", "hookless_forward")

    def __init__(self, every: int, scaler: Any = None, optimizer: Any = None) -> None:
        self.every = every
        self.step = 0
        self.recording = True
        self.grad_forward_seen = False  # a forward with autograd on ran in this step
        self.compiled_forward = False  # ... and it ran in a graph Dynamo compiled (its traced pre-hook)
        self.hookless_forward = False  # one ran in code compiled without the model's hooks (compilation)
        self.held = False  # inside paused(): the forwards are an analysis's, not training's
        self._watch_scaler = scaler is not None and optimizer is not None

    def advance(self) -> None:
        """The step ended: the next one begins (recorded or not)."""
        self.step += 1
        self.recording = self.step % self.every == 0
        self.grad_forward_seen = self.compiled_forward = self.hookless_forward = False

    def skipped_by_scaler(self) -> bool:
        """As an ``update()`` of the optimizer's scaler begins: whether a training forward ran and no
        optimizer step since, so the scaler skipped it (it found inf); the caller ends the step."""
        return self._watch_scaler and self.grad_forward_seen

    def scalar_step(self) -> int:
        """The step that ``step(loss=)`` refers to: the one whose training forward ran last."""
        return self.step if self.grad_forward_seen else self.step - 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is recorded inside (attribution checkpoints run the model between steps)."""
        saved = (self.recording, self.grad_forward_seen, self.compiled_forward, self.hookless_forward,
                 self._watch_scaler, self.held)
        self.recording = self._watch_scaler = False
        self.held = True
        try:
            yield
        finally:
            (self.recording, self.grad_forward_seen, self.compiled_forward, self.hookless_forward,
             self._watch_scaler, self.held) = saved
