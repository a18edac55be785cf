"""Each backward pass's own gradient norm: the small batches of the gradient noise scale.

McCandlish et al. (2018, appendix A) estimate |G|^2 and tr(Sigma) from the squared gradient
norms of small and big batches. Training already computes both where it accumulates gradients
over micro-batches or averages them over ranks: a micro-batch's gradient passes through each
parameter's tensor hook before autograd adds it to ``.grad`` (before DDP averages it), and the
step's ``.grad`` is the big batch's. So no backward pass is added: a hook per parameter writes
the norm of what arrives into a device vector, and a callback at the backward's end folds its
squares into the step's ``grad_small_ss``. Attached only with ``watch(noise_scale=True)``.

A step's small batches are the backwards whose gradients ``.grad`` sums when the update reads
it, so what is not added to it is left out: a pass that did not accumulate (``autograd.grad``
on the parameters), one that raised, and, where ``.grad`` was reset between two backwards of a
step (SAM, LBFGS closures), the ones before the reset. All of it is told from host metadata
(which tensor ``.grad`` is, and its version counter), never from the device.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from gradscope.recording.buffer import StatsBuffer
from gradscope.recording.clock import StepClock
from gradscope.recording.compilation import python_when_entered
from gradscope.recording.copies import MethodHook
from gradscope.recording.user_warnings import warn_user
from gradscope.store.schema import GRAD_SMALL_SS


def _grad_state(p: Tensor) -> tuple[int, int] | None:
    """Which tensor ``p.grad`` is and its version: changes when autograd accumulates into it."""
    g = p.grad
    return None if g is None else (id(g), g._version)


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class MicroBatchNorms:
    """Per recorded step: the sum over its backward passes of ||gradient||^2, how many there were
    and how many samples their forwards held (the first dimension of the model's first tensor input)."""

    def __init__(self, model: nn.Module, outer: nn.Module, clock: StepClock, buffer: StatsBuffer, slot: Any,
                 device: torch.device, several: bool) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if any(type(p).__name__ in ("DTensor", "FlatParameter") for p in params):
            raise ValueError("gradscope.watch: noise_scale=True needs whole parameters on each rank (DDP or one "
                             "process); under FSDP each rank holds a shard, whose gradient is no small batch's")
        self._clock, self._buffer, self._slot = clock, buffer, slot
        self._norms = torch.zeros(len(params), dtype=torch.float32, device=device)
        self._samples = 0  # of the last training forward, which the next backward takes
        self._pass: list[Any] | None = None  # the backward in progress: [samples, first parameter, its state]
        self._last: tuple[int, Any] | None = None  # after the last backward: (parameter, state of its .grad)
        self._several = several  # DDP rewrites .grad after a backward: no reset to tell apart there
        self._backwards: dict[int, int] = {}  # slot -> backward passes of this rank in the step
        # samples are counted on the outermost module: it runs eagerly also around a compiled
        # model (torch.compile(model)'s wrapper) and DDP
        self._outer, self._params = outer, params
        self._handles: list[Any] = []
        self._fresh = False  # a training forward ran since the last backward began
        self._eager_forwards = False  # some training forward was seen here (not traced in place)
        self._tangled: set[int] = set()  # slots with several backwards of one forward (retain_graph)
        self._warned: set[str] = set()

    def attach(self) -> None:
        """Hook every parameter and the model (after the run is open: a refused run leaves no hook)."""
        self._handles = [p.register_hook(partial(self._gradient, i)) for i, p in enumerate(self._params)]
        self._handles.append(self._outer.register_forward_pre_hook(_SamplesOfForward(self._forward), with_kwargs=True))

    @python_when_entered
    def _forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        """Samples of a training forward: the first dimension of its first tensor argument (keyword
        arguments too: Hugging Face models take ``input_ids=``). None found: none counted, and the
        analysis asks for the micro-batch size. The next backward takes the last forward's: only
        then is it known whether the step is recorded (a GradScaler-skipped step ends at the next
        forward), and a forward no backward follows (an evaluation with autograd on) is replaced."""
        if _in_backward():  # recomputed by activation checkpointing: no forward of its own
            return
        self._drop_unfinished()
        if torch.is_grad_enabled() and not self._clock.held and not torch.compiler.is_compiling():
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.dim()), None)
            self._samples = int(first.shape[0]) if first is not None else 0
            self._fresh = self._eager_forwards = True

    def _drop_unfinished(self) -> None:
        """A backward whose end never came (it raised): its norms are no small batch's."""
        if self._pass is not None:
            self._pass = None
            self._norms.zero_()

    @python_when_entered
    def _gradient(self, i: int, grad: Tensor) -> None:
        if self._pass is None:  # the first parameter gradient of a backward (a nested backward of
            fresh, self._fresh = self._fresh, False  # reentrant checkpointing is part of the one in progress)
            if not self._clock.recording:
                self._samples = 0
                return
            self._pass = [self._samples, i, _grad_state(self._params[i])]
            self._samples = 0
            if self._eager_forwards and not fresh and self._backwards.get(self._slot()):
                self._tangled.add(self._slot())  # a second backward of one forward: not a small batch of its own
            self._drop_if_reset()
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_end)
        if grad.is_sparse:  # nn.Embedding(sparse=True): duplicate rows add up before the norm
            grad = grad.coalesce().values()
        torch.linalg.vector_norm(grad, dtype=torch.float32, out=self._norms[i])

    def _drop_if_reset(self) -> None:
        """``.grad`` changed between this step's last backward and this one (SAM's or LBFGS's
        ``zero_grad`` between closure evaluations): the earlier backwards are not in the update."""
        slot = self._slot()
        if self._several or not self._backwards.get(slot) or self._last is None:
            return
        i, state = self._last
        if _grad_state(self._params[i]) == state:
            return
        self._backwards[slot] = 0
        self._clear(slot)
        self._warn("reset", "gradscope: .grad was reset between two backward passes of one step (SAM, LBFGS); "
                   "the noise scale's small batches are the backwards after the reset")

    def _backward_end(self) -> None:
        """After every parameter's gradient of one backward arrived: fold them into the step, if
        autograd added them to ``.grad`` (``torch.autograd.grad`` on the parameters does not)."""
        samples, i, state = self._pass
        self._pass = None
        now = _grad_state(self._params[i])
        self._last = (i, now)
        if now == state:  # nothing added to .grad: the forward's samples wait for the backward that does
            self._norms.zero_()
            self._samples, self._fresh = samples, True
            return
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

    def end_step(self, slot: int) -> None:
        """The step's gradient is complete: each backward's norm onto the update's scale, x k^2 for
        k backwards (``.grad`` is their sum, so a micro-batch's own gradient is k times its share)."""
        self._drop_unfinished()
        k = self._backwards.pop(slot, 0)
        if slot in self._tangled:
            self._tangled.discard(slot)
            k = 0
            self._clear(slot)
            self._warn("tangled", "gradscope: a step ran several backward passes of one forward (retain_graph); its "
                       "micro-batches cannot be told apart, so it has no small batches for the noise scale")
        if k > 1:
            self._buffer.step[slot, GRAD_SMALL_SS].mul_(float(k * k))
        self._backwards.clear()
        self._last = None

    def _clear(self, slot: int) -> None:
        """No small batches in ``slot`` (the next fold writes over the device column)."""
        counts = self._buffer.counts
        counts.step_set[slot, GRAD_SMALL_SS] = False
        counts.micro_batches[slot] = counts.micro_samples[slot] = 0

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warn_user(message)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _SamplesOfForward(MethodHook):
    """The outer module's pre-hook (``MicroBatches._forward``), as an object (``copies``)."""

    __slots__ = ()

    @python_when_entered
    def __call__(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        self.method(module, args, kwargs)
