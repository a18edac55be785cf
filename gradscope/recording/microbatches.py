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

import warnings
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from gradscope.recording.buffer import StatsBuffer
from gradscope.recording.clock import StepClock
from gradscope.recording.optimizers import has_closure
from gradscope.store.schema import GRAD_SMALL_SS


class MicroBatchNorms:
    """Per recorded step: the sum over its backward passes of ||gradient||^2, how many there were
    and how many samples their forwards held (the first dimension of the model's first tensor input)."""

    def __init__(self, model: nn.Module, outer: nn.Module, optimizer: Any, clock: StepClock, buffer: StatsBuffer,
                 slot: Any, device: torch.device) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if any(type(p).__name__ in ("DTensor", "FlatParameter") for p in params):
            raise ValueError("gradscope.watch: noise_scale=True needs whole parameters on each rank (DDP or one "
                             "process); under FSDP each rank holds a shard, whose gradient is no small batch's")
        self._clock, self._buffer, self._slot = clock, buffer, slot
        self._norms = torch.zeros(len(params), dtype=torch.float32, device=device)
        self._samples = 0  # of the last training forward, which the next backward takes
        self._task: int | None = None  # the autograd graph task of the backward in progress
        self._task_samples = 0  # the samples that backward took
        self._backwards: dict[int, int] = {}  # slot -> backward passes of this rank in the step
        # samples are counted on the outermost module: it runs eagerly also around a compiled
        # model (torch.compile(model)'s wrapper) and DDP
        self._outer, self._params, self._optimizer = outer, params, optimizer
        self._handles: list[Any] = []
        self._closure_warned = False
        self._before_closure = 0  # backward passes of the step before its optimizer.step(closure)

    def attach(self) -> None:
        """Hook every parameter and the model (after the run is open: a refused run leaves no hook)."""
        self._handles = [p.register_hook(partial(self._gradient, i)) for i, p in enumerate(self._params)]
        self._handles.append(self._outer.register_forward_pre_hook(self._forward, with_kwargs=True))
        if self._optimizer is not None:  # before the recorder's own: a closure step is settled before it ends
            self._handles.append(self._optimizer.register_step_pre_hook(self._closure_begins))
            self._handles.append(self._optimizer.register_step_post_hook(self._closure_ended))

    def _forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """Samples of a training forward: the first dimension of its first tensor argument (keyword
        arguments too: Hugging Face models take ``input_ids=``). None found: none counted, and the
        analysis asks for the micro-batch size. The next backward takes the last forward's: only
        then is it known whether the step is recorded (a GradScaler-skipped step ends at the next
        forward), and a forward no backward follows (an evaluation with autograd on) is replaced."""
        if torch.is_grad_enabled() and not self._clock.held and not torch.compiler.is_compiling():
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.dim()), None)
            self._samples = int(first.shape[0]) if first is not None else 0

    def _gradient(self, i: int, grad: Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if task != self._task:  # the first parameter gradient of a backward
            if self._task is not None:  # the last backward never ended (it raised): drop its norms
                self._norms.zero_()
            self._task, self._task_samples, self._samples = task, self._samples, 0
            if not self._clock.recording:
                self._task = None
                return
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)
        elif not self._clock.recording:
            return
        if grad.is_sparse:  # nn.Embedding(sparse=True): duplicate rows add up before the norm
            grad = grad.coalesce().values()
        torch.linalg.vector_norm(grad, dtype=torch.float32, out=self._norms[i])

    def _backward_end(self) -> None:
        """After every parameter's gradient of one backward arrived: fold them into the step."""
        samples, self._task = self._task_samples, None
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
        counts.micro_samples[slot] += samples
        self._backwards[slot] = self._backwards.get(slot, 0) + 1

    def _closure_begins(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """``optimizer.step(closure)``: note the backward passes so far (Lightning runs a step's
        last micro-batch in the closure, after the others)."""
        self._before_closure = self._backwards.get(self._slot(), 0) if self._clock.recording else 0

    def _closure_ended(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """A closure evaluated more than once (LBFGS, SAM) replaces ``.grad`` each time rather than
        adding to it: its backwards are no micro-batches of the step, so the step keeps none."""
        if not has_closure(args, kwargs) or not self._clock.recording:
            return
        slot = self._slot()
        if self._backwards.get(slot, 0) - self._before_closure <= 1:
            return
        self._backwards.pop(slot)
        counts = self._buffer.counts
        counts.step_set[slot, GRAD_SMALL_SS] = False
        counts.micro_batches[slot] = counts.micro_samples[slot] = 0
        if not self._closure_warned:
            self._closure_warned = True
            warnings.warn("gradscope: an optimizer step evaluated its closure several times (LBFGS, SAM); each "
                          "replaces .grad, so such steps have no small batches for the noise scale",
                          RuntimeWarning, stacklevel=4)

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
