"""The sink: the one interface through which probes write what they measure.

A probe knows *what* to measure and *where* (``recording.probes``); the sink knows *how* it
accumulates into the statistics buffer: on a GPU with Triton, tensors held by the ``Batcher``
and reduced many per launch; elsewhere torch ops now, or pending until the step's end. It also
opens the slot of a recorded step and keeps the host counts that go with every write, so probes
never touch the buffer, the counts or the recorder.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradscope.recording.amp import LossScale
from gradscope.recording.batching import Batcher
from gradscope.recording.buffer import StatsBuffer
from gradscope.recording.clock import StepClock
from gradscope.recording.identity import sample_squares, token_direction_sums
from gradscope.recording.moments import Scratch, accumulate_square, activation_moments, merge_activation_
from gradscope.store.schema import ACCURACY, B_BRANCH_SS, B_GRAD_IN_SS, GRAD_OUT_SS, GRAD_PRE_CLIP_SS, LOSS, TRAIN


class Sink:
    """Routes a step's measurements into the buffer; owned by a ``Recorder``."""

    def __init__(self, clock: StepClock, buffer: StatsBuffer, batcher: Batcher | None, loss_scale: LossScale,
                 on_full: Callable[[], None]) -> None:
        self.clock, self.buffer, self.batcher, self.loss_scale = clock, buffer, batcher, loss_scale
        self.counts = buffer.counts
        self.scratch = Scratch()  # CPU work vector of the formulas, held during a forward only
        self._on_full = on_full  # makes room: flushes all but the latest slot (or grows, several processes)

    # ------------------------------------------------------------------ slots

    def slot(self) -> int:
        """Buffer slot of the current step, opened on first use (flushing a full buffer)."""
        buffer, step = self.buffer, self.clock.step
        slot = buffer.slots.get(step)
        if slot is None:
            if buffer.full():
                self._on_full()
            slot = buffer.open(step)
            self.loss_scale.opened()
            if self.batcher is not None:  # batched kernels add squared norms to what is there
                buffer.layer[slot, TRAIN, :, GRAD_OUT_SS].zero_()
        return slot

    def slot_of(self, step: int) -> int | None:
        """The slot of an earlier ``step`` (for gradients arriving in its backward); None once gone."""
        return self.buffer.slot_of(step)

    # ------------------------------------------------------------------ layers

    def activation(self, slot: int, phase: int, row: int, y: Tensor, bounds: tuple[float, float] | None,
                   count_zeros: bool) -> None:
        """A watched layer's output ``y``: its moments, merged with the step's earlier calls."""
        counts, batcher, buffer = self.counts, self.batcher, self.buffer
        seen = counts.act_n[slot, phase, row]
        if seen:  # the module ran again in this step: merge the calls (the first must be written,
            # and the batcher may drop it there if it was held and then changed in place)
            self.commit_moments()
            seen = counts.act_n[slot, phase, row]
        if seen == 0 and batcher is not None and batcher.hold_output(y, slot, phase, row):
            pass  # held, and reduced with the others' when the forward ends
        elif seen == 0 and batcher is not None and batcher.reduce_now(y.detach(), slot, phase, row):
            batcher.learn(row, y)  # one launch now; held from the next step if it survives
        elif seen == 0:  # (or no batcher can read y) written with every layer's at the step's end
            # y is detached, so no autograd graph is recorded (cheaper than entering no_grad)
            parts = activation_moments(y.detach(), bounds, count_zeros, self.scratch)
            buffer.pending_moments.append((slot, buffer.layer_offset(0, phase, row), parts))
        else:
            parts = activation_moments(y.detach(), bounds, count_zeros, self.scratch)
            dst = buffer.view(False, buffer.layer_offset(slot, phase, row), len(parts))
            merge_activation_(dst, torch.stack(parts), int(seen), y.numel())
        counts.act_n[slot, phase, row] += y.numel()
        counts.act_calls[slot, phase, row] += 1
        if phase == TRAIN and self.loss_scale.scaler is not None:  # the scale the coming backward runs with
            self.loss_scale.capture(slot)  # (copied now: update() may come before the step's end)

    def layer_gradient(self, slot: int, row: int, grad: Tensor) -> None:
        """dL/dy of a watched layer's output: ||dL/dy||^2 added up over the step's calls."""
        counts = self.counts
        self.loss_scale.capture(slot)  # the scale this backward ran with
        self._add_square(self.buffer.layer_offset(slot, TRAIN, row) + GRAD_OUT_SS, grad,
                         first=counts.grad_calls[slot, row] == 0)
        counts.grad_n[slot, row] += grad.numel()
        counts.grad_calls[slot, row] += 1

    # ------------------------------------------------------------------ blocks

    def block_call(self, slot: int, row: int) -> None:
        """A watched block ran in this step."""
        self.counts.block_calls[slot, row] += 1

    def block_terms(self, slot: int, row: int, x: Tensor | None, y: Tensor, tokens: bool) -> None:
        """A block call compared with the identity (``x`` its same-shape input, or None) and, with
        ``tokens``, its output's token cosines (``y`` [batch, tokens, dim]; both detached)."""
        counts, buffer = self.counts, self.buffer
        squares, sums = self._block_terms(x, y, tokens)
        if squares is not None:
            buffer.pending_identity.append((slot, row, squares))
            counts.block_samples[slot, row] += x.shape[0] if x.dim() else 1  # type: ignore[union-attr]
        if sums is not None:
            buffer.pending_tokens.append((slot, row, (sums, y.shape[1])))
            counts.block_tokens[slot, row] += y.shape[0]

    def branch(self, slot: int, row: int, f: Tensor) -> None:
        """A block's residual-branch output F(x) (detached): ||F(x)||^2 for ``branch_ratio``.

        F(x) is often modified in place next (``out += x``), so on the CPU it is reduced now; on a
        GPU the batcher holds it only where that was seen not to happen (the block's row starts
        at zero, so both paths add).
        """
        buffer, counts = self.buffer, self.counts
        offset = buffer.block_offset(slot, row) + B_BRANCH_SS
        batcher = self.batcher
        if batcher is None or not batcher.branch_square(row, buffer.block_base + offset, slot, f):
            accumulate_square(buffer.view(True, offset), f, first=counts.block_branch[slot, row] == 0)
        counts.block_branch[slot, row] += 1

    def block_gradient(self, slot: int, row: int, column: int, grad: Tensor) -> None:
        """dL/dx (``column`` B_GRAD_IN_SS) or dL/dy (B_GRAD_OUT_SS) of a block: squared norms added up."""
        self.loss_scale.capture(slot)
        seen = self.counts.block_grad_in if column == B_GRAD_IN_SS else self.counts.block_grad_out
        buffer = self.buffer
        self._add_square(buffer.block_base + buffer.block_offset(slot, row) + column, grad,
                         first=seen[slot, row] == 0)
        seen[slot, row] += 1

    # ------------------------------------------------------------------ steps

    def scalar(self, slot: int, column: int, value: Any) -> None:
        """A step scalar (loss, accuracy, ...): a Python number or a one-element tensor (no sync)."""
        if value is None:
            return
        dst = self.buffer.step[slot, column]
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"gradscope: expected a scalar, got a tensor of shape {tuple(value.shape)}")
            dst.copy_(value.detach().reshape(()))
        else:
            dst.fill_(float(value))
        self.counts.step_set[slot, column] = True

    def step_scalars(self, slot: int, loss: Any, accuracy: Any, grad_norm_pre_clip: Any = None, *,
                     counted_here: bool = True) -> None:
        """``step()``'s scalars. A framework's pre-clip norm is global on every rank: it is counted
        where ``counted_here`` (rank 0), since the ranks' squared norms add up."""
        for column, value in ((LOSS, loss), (ACCURACY, accuracy)):
            self.scalar(slot, column, value)
        if grad_norm_pre_clip is not None and counted_here:
            norm = grad_norm_pre_clip.detach().float() if isinstance(grad_norm_pre_clip, Tensor) \
                else float(grad_norm_pre_clip)
            self.scalar(slot, GRAD_PRE_CLIP_SS, norm * norm)

    # ------------------------------------------------------------------ the forward's and the step's end

    def end_forward(self) -> None:
        """The model's forward returned: the work vector is not needed until the next, and the
        outputs held for a batched reduction are reduced."""
        self.scratch.release()
        if self.batcher is not None:
            self.batcher.end_forward()

    def commit_moments(self) -> None:
        """Write every first call's moments into the buffer (held outputs reduced first)."""
        if self.batcher is not None:
            self.batcher.finish()
        self.buffer.commit_moments()

    def commit(self) -> None:
        """Everything measured so far, written into the buffer (the step ends, or a flush copies it)."""
        if self.batcher is not None:
            self.batcher.reduce_all()
        self.commit_moments()
        self.buffer.commit_blocks()
        if self.batcher is not None:
            self.batcher.recycle()

    # ------------------------------------------------------------------ internals

    def _add_square(self, offset: int, grad: Tensor, first: bool) -> None:
        """Add ||grad||^2 to element ``offset`` of the buffer (layer, or block from ``block_base``
        on): held for a batched reduction where possible, else reduced now."""
        batcher = self.batcher
        if batcher is not None:
            if batcher.add_square(offset, grad):
                return
            first = False  # the element was zeroed when the slot opened; the kernels add to it
        accumulate_square(self.buffer.view(False, offset), grad, first)

    def _block_terms(self, x: Tensor | None, y: Tensor, tokens: bool) -> tuple[Tensor | None, Tensor | None]:
        """Per-sample ||y - x||^2, ||x||^2, ||y||^2 ([3, samples], ``identity.sample_squares``) of a
        block call and, with ``tokens``, the token direction sums of y [batch, tokens, dim]
        (``identity.token_direction_sums``). On a GPU with Triton one launch reads both tensors."""
        squares = sums = None
        batcher = self.batcher
        if tokens and batcher is not None:
            fused = batcher.block_sums(x, y)
            if fused is not None:
                squares, sums = fused
        if sums is None and tokens:
            sums = token_direction_sums(y)
        if squares is None and x is not None:
            if batcher is not None:
                squares = batcher.sample_squares(x, y)
            if squares is None:
                squares = sample_squares(x, y, self.scratch)
        return squares, sums
