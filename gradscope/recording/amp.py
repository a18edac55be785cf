"""The AMP loss scale: gradients of a scaled loss carry it, so the recorder notes it per step.

The scaler's scale tensor is copied into the step buffer once per recorded step, on the device
(no sync); the host finaliser divides the recorded gradient norms by it (``store.schema``).
It is copied at the step's first training forward or gradient, not at its end: ``Recorder.step()``
may come after ``scaler.update()``, whose scale is already the next step's.

Parameter gradients carry the scale only until the scaler unscales them, which the host can tell
from the scaler's own per-optimizer state: a stage of UNSCALED or STEPPED, or a state dict that
``update()`` has replaced since the step began (``update()`` needs the inf checks that only
``unscale_()``, and so ``scaler.step()``, records).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gradscope.store.schema import LOSS_SCALE, HostCounts


class LossScale:
    """Copies a ``GradScaler``'s scale into the step buffer; a no-op without one."""

    __slots__ = ("scaler", "optimizer", "step_buf", "counts", "_states")

    def __init__(self, scaler: Any, optimizer: Any, step_buf: Tensor, counts: HostCounts) -> None:
        self.scaler, self.optimizer, self.step_buf, self.counts = scaler, optimizer, step_buf, counts
        self._states: Any = None  # the scaler's per-optimizer states as the step began

    def opened(self) -> None:
        """A recorded step's slot was just opened (by its first probe, as a rule)."""
        if self.scaler is not None:
            self._states = getattr(self.scaler, "_per_optimizer_states", None)

    def capture(self, slot: int, *, at_end: bool = False) -> None:
        """The scale this step's backward runs with, once per step: from its first training
        forward or gradient, or else at its end (``at_end``), when it may already be the next's."""
        scaler = self.scaler
        if scaler is None or self.counts.step_set[slot, LOSS_SCALE] or not scaler.is_enabled():
            return
        scale = getattr(scaler, "_scale", None)  # None until the first scaler.scale(loss)
        if scale is not None:
            self.step_buf[slot, LOSS_SCALE].copy_(scale.reshape(()))
            self.counts.step_set[slot, LOSS_SCALE] = True
            if not at_end:  # the states this step's unscale_() and update() will act on
                self._states = getattr(scaler, "_per_optimizer_states", None)

    def note_parameter_gradients(self, slot: int) -> None:
        """At the step's end: whether the parameter gradients just recorded still carry the scale."""
        self.capture(slot, at_end=True)
        if self.counts.step_set[slot, LOSS_SCALE]:
            self.counts.grads_scaled[slot] = not self._unscaled()

    def _unscaled(self) -> bool:
        """Whether the scaler has already unscaled the gradients in this step.

        ``update()`` replaced the per-optimizer states since the step began: it ran after
        ``unscale_()`` (``scaler.step()``), so yes. Otherwise, with an optimizer, its own state
        says; without one, any optimizer unscaled by the scaler (``scaler.unscale_(opt)`` before
        clipping, say) counts.
        """
        states = getattr(self.scaler, "_per_optimizer_states", {})
        if states is not self._states:
            return True
        chosen = [states.get(id(self.optimizer), {})] if self.optimizer is not None else list(states.values())
        return any(getattr(s.get("stage"), "name", None) in ("UNSCALED", "STEPPED") for s in chosen)
