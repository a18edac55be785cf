"""Each backward pass's own gradient norm: the small batches of the gradient noise scale.

McCandlish et al. (2018, appendix A) estimate |G|^2 and tr(Sigma) from the squared gradient
norms of small and big batches. Training already computes both where it accumulates gradients
over micro-batches or averages them over ranks: a micro-batch's gradient passes through each
parameter's tensor hook before autograd adds it to ``.grad`` (before DDP averages it), and the
step's ``.grad`` is the big batch's. So no backward pass is added: a hook per parameter writes
the norm of what arrives into a device vector, and a callback at the backward's end folds its
squares into the step's ``grad_small_ss``. Attached only with ``watch(noise_scale=True)``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from gradscope.recording.buffer import StatsBuffer
from gradscope.recording.clock import StepClock
from gradscope.store.schema import GRAD_SMALL_SS


class MicroBatchNorms:
    """Per recorded step: the sum over its backward passes of ||gradient||^2, how many there were
    and how many samples their forwards held (the first dimension of the model's first tensor input)."""

    def __init__(self, model: nn.Module, outer: nn.Module, clock: StepClock, buffer: StatsBuffer, slot: Any,
                 device: torch.device) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if any(type(p).__name__ in ("DTensor", "FlatParameter") for p in params):
            raise ValueError("gradscope.watch: noise_scale=True needs whole parameters on each rank (DDP or one "
                             "process); under FSDP each rank holds a shard, whose gradient is no small batch's")
        self._clock, self._buffer, self._slot = clock, buffer, slot
        self._norms = torch.zeros(len(params), dtype=torch.float32, device=device)
        self._pending = False  # a backward's norms are in _norms, its end callback queued
        self._samples = 0  # samples of the forwards since the last backward ended
        self._backwards: dict[int, int] = {}  # slot -> backward passes of this rank in the step
        self._outer, self._params = outer, params  # samples are counted on the outermost module, which
        # runs eagerly also around a compiled model (torch.compile(model)'s wrapper, DDP)
        self._handles: list[Any] = []

    def attach(self) -> None:
        """Hook every parameter and the model (after the run is open: a refused run leaves no hook)."""
        self._handles = [p.register_hook(partial(self._gradient, i)) for i, p in enumerate(self._params)]
        self._handles.append(self._outer.register_forward_pre_hook(self._forward, with_kwargs=True))

    def _forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """Samples of a training forward: the first dimension of its first tensor argument (keyword
        arguments too: Hugging Face models take ``input_ids=``). None found: none counted, and the
        analysis asks for the micro-batch size."""
        if self._clock.recording and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.dim()), None)
            if first is not None:
                self._samples += int(first.shape[0])

    def _gradient(self, i: int, grad: Tensor) -> None:
        if not self._clock.recording:
            return
        torch.linalg.vector_norm(grad, dtype=torch.float32, out=self._norms[i])
        if not self._pending:
            self._pending = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)

    def _backward_end(self) -> None:
        """After every parameter's gradient of one backward arrived: fold them into the step."""
        self._pending = False
        slot = self._slot()
        counts, column = self._buffer.counts, self._buffer.step[slot, GRAD_SMALL_SS]
        total = self._norms.square().sum()
        if counts.step_set[slot, GRAD_SMALL_SS]:
            column.add_(total)
        else:
            column.copy_(total)
            counts.step_set[slot, GRAD_SMALL_SS] = True
        self._norms.zero_()
        counts.micro_batches[slot] += 1
        counts.micro_samples[slot] += self._samples
        self._samples = 0
        self._backwards[slot] = self._backwards.get(slot, 0) + 1

    def end_step(self, slot: int) -> None:
        """The step's gradient is complete: each backward's norm onto the update's scale, x k^2 for
        k backwards (``.grad`` is their sum, so a micro-batch's own gradient is k times its share)."""
        k = self._backwards.pop(slot, 0)
        if k > 1:
            self._buffer.step[slot, GRAD_SMALL_SS].mul_(float(k * k))
        self._backwards.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
