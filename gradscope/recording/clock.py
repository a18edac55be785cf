"""The step clock: which step training is in, whether it is recorded, and when it ends.

Step boundaries: with ``optimizer=`` the optimizer's own step hooks mark them (the pre-hook sees
the final gradients, after clipping and AMP unscaling, just before the update); without it the
user calls ``Recorder.step()`` after ``backward()``. Gradient accumulation therefore merges
micro-batches into one recorded step, as it should. A ``GradScaler`` that finds inf/NaN skips
``optimizer.step()``, so the optimizer's hooks never mark that step; ``scaler.update()``
replacing its per-optimizer state dict still does, and the next forward notices
(``scaler_skipped``). Everything here is plain Python, so hooks test it without touching a tensor.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


class StepClock:
    """Step numbers and the ``every`` schedule: steps 0, every, 2*every, ... are recorded."""

    __slots__ = ("every", "step", "recording", "grad_forward_seen", "held", "_scaler", "_watch_scaler",
                 "_scaler_states")

    def __init__(self, every: int, scaler: Any = None, optimizer: Any = None) -> None:
        self.every = every
        self.step = 0
        self.recording = True
        self.grad_forward_seen = False  # a forward with autograd on ran in this step
        self.held = False  # inside paused(): the forwards are an analysis's, not training's
        self._scaler = scaler
        self._watch_scaler = scaler is not None and optimizer is not None
        self._scaler_states: Any = None

    def advance(self) -> None:
        """The step ended: the next one begins (recorded or not)."""
        self.step += 1
        self.recording = self.step % self.every == 0
        self.grad_forward_seen = False
        self._scaler_states = None

    def scaler_skipped(self) -> bool:
        """Before a model forward: end a step that the GradScaler skipped (True when it did)."""
        if not self._watch_scaler:
            return False
        states = self._scaler._per_optimizer_states
        if states is self._scaler_states:
            return False
        skipped = self._scaler_states is not None  # update() ran with no optimizer step since
        if skipped:
            self.advance()
        self._scaler_states = states
        return skipped

    def scalar_step(self) -> int:
        """The step that ``step(loss=)`` refers to: the one whose training forward ran last."""
        return self.step if self.grad_forward_seen else self.step - 1

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is recorded inside (attribution checkpoints run the model between steps)."""
        saved = (self.recording, self.grad_forward_seen, self._watch_scaler, self._scaler_states, self.held)
        self.recording = self._watch_scaler = False
        self.held = True
        try:
            yield
        finally:
            self.recording, self.grad_forward_seen, self._watch_scaler, self._scaler_states, self.held = saved
