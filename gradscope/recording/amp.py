"""The AMP loss scale: gradients of a scaled loss carry it, so the recorder notes it per step.

The scaler's scale tensor is copied into the step buffer once per recorded step, on the device
(no sync); the host finaliser divides the recorded gradient norms by it (``store.schema``).
It is copied at the step's first training forward or gradient, not at its end: ``Recorder.step()``
may come after ``scaler.update()``, whose scale is already the next step's.

Parameter gradients carry the scale only until the scaler unscales them, which the host can tell
from the scaler's own per-optimizer state: a stage of UNSCALED or STEPPED, or a state dict that
``update()`` has replaced since the step began (``update()`` needs the inf checks that only
``unscale_()``, and so ``scaler.step()``, records).

A step the scaler skips (it found inf) runs no ``optimizer.step()``, so no optimizer hook ends it;
``ScalerUpdateHook`` lets ``scaler.update()`` end it instead (before the update changes the scale),
which runs in Python even where the model is compiled and gradscope's forward hooks are traced
into its graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
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

    def optimizer_in_update(self) -> bool:
        """As ``scaler.update()`` begins: whether it acts on the watched optimizer's inf checks (one
        scaler may serve several optimizers, and accelerate updates it after each one's step)."""
        return _unscaled_stage(getattr(self.scaler, "_per_optimizer_states", {}).get(id(self.optimizer), {}))

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
        return any(_unscaled_stage(s) for s in chosen)


def _unscaled_stage(state: dict[str, Any]) -> bool:
    """Whether one optimizer's scaler state says ``unscale_()`` ran for it (UNSCALED, or STEPPED)."""
    return getattr(state.get("stage"), "name", None) in ("UNSCALED", "STEPPED")


class ScalerUpdateHook:
    """Set as a scaler's ``update`` (GradScaler has no hooks of its own): calls ``callback`` as each
    ``update()`` begins, eagerly even inside a compiled function, then the update (also when the
    callback raised). Only this instance is touched; ``remove()`` puts back what was there, and a
    copy or pickle of the scaler made meanwhile gets the plain ``update``."""

    def __init__(self, scaler: Any, callback: Callable[[], None]) -> None:
        self.scaler = scaler
        self.previous = vars(scaler).get("update")  # a wrapper someone else set on this instance
        self.original = scaler.update
        self.callback: Callable[[], None] | None = torch.compiler.disable(callback)
        scaler.update = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        callback = self.callback
        try:
            if callback is not None:
                callback()
        finally:
            result = self.original(*args, **kwargs)
        return result

    def remove(self) -> None:
        self.callback = None  # a wrapper left in place (wrapped again since) keeps no recorder alive
        if vars(self.scaler).get("update") is self:
            previous = self.previous
            while isinstance(previous, ScalerUpdateHook) and previous.callback is None:
                previous = previous.previous  # another recorder's, removed already
            if previous is None:
                del self.scaler.update
            else:
                self.scaler.update = previous

    def __reduce__(self) -> tuple[Any, ...]:
        if self.previous is not None:
            return _itself, (self.previous,)
        return getattr, (self.scaler, "update")  # the class's, while the copy has no attribute of its own


def _itself(value: Any) -> Any:
    return value
