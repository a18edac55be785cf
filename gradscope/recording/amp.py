"""The AMP loss scale: gradients of a scaled loss carry it, so the recorder notes it per step.

The scaler's scale tensor is copied into the step buffer once per recorded step, on the device
(no sync); the host finaliser divides the recorded gradient norms by it (``store.schema``).
Parameter gradients carry it only until the scaler unscales them, which the host can tell from
the scaler's own per-optimizer state.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from gradscope.store.schema import LOSS_SCALE, HostCounts


class LossScale:
    """Copies a ``GradScaler``'s scale into the step buffer; a no-op without one."""

    __slots__ = ("scaler", "optimizer", "step_buf", "counts")

    def __init__(self, scaler: Any, optimizer: Any, step_buf: Tensor, counts: HostCounts) -> None:
        self.scaler, self.optimizer, self.step_buf, self.counts = scaler, optimizer, step_buf, counts

    def capture(self, slot: int) -> None:
        """The scale this step's backward ran with, once per step."""
        scaler = self.scaler
        if scaler is None or self.counts.step_set[slot, LOSS_SCALE] or not scaler.is_enabled():
            return
        scale = getattr(scaler, "_scale", None)
        if scale is not None:
            self.step_buf[slot, LOSS_SCALE].copy_(scale.reshape(()))
            self.counts.step_set[slot, LOSS_SCALE] = True

    def note_parameter_gradients(self, slot: int) -> None:
        """At the step's end: whether the parameter gradients just recorded still carry the scale."""
        self.capture(slot)
        if self.counts.step_set[slot, LOSS_SCALE]:
            self.counts.grads_scaled[slot] = not self._unscaled()

    def _unscaled(self) -> bool:
        """Whether the scaler has already unscaled the gradients in this step.

        With an optimizer, its own state says; without one, any optimizer unscaled by the scaler
        (``scaler.unscale_(opt)`` before clipping, say) counts.
        """
        states = getattr(self.scaler, "_per_optimizer_states", {})
        chosen = [states.get(id(self.optimizer), {})] if self.optimizer is not None else list(states.values())
        return any(getattr(s.get("stage"), "name", None) in ("UNSCALED", "STEPPED") for s in chosen)
