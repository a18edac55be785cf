"""What is measured where: forward hooks on watched modules and gradient hooks on their outputs.

Probes are observers. They run their statistics under ``no_grad`` so nothing joins the user's
graph, never return a value (so outputs and gradients pass through untouched), and hold no
tensor past the call. The gradient flowing back through a layer, dL/dy, is taken with a pre-hook
on the autograd node that produced the output (``on_gradient``) rather than
``register_full_backward_hook``: a module backward hook wraps the output in a view that
``ReLU(inplace=True)`` then fails to modify, while the producing node receives exactly the
gradient of the tensor as the layer produced it, whatever in-place op follows. (A tensor hook
has the same meaning but costs three times as much to register, hundreds of times per step.)

Probes read the step clock and write through the ``Sink``; how a measurement accumulates into
the statistics buffer is the sink's business.

Activation checkpointing runs a forward twice. Non-reentrant checkpointing records the first
(a normal training forward) and recomputes inside backward only to refill saved tensors: the
recomputation is not measured. Reentrant checkpointing (``use_reentrant=True``) runs the first
forward under ``no_grad`` and backpropagates through the recomputation: for modules in training
mode that one is measured, as the training forward it stands for, and the first only gives them
their place in the execution order (``checkpoint_pass``). Modules in eval mode are measured in the
first pass, as without checkpointing (phase "eval", no gradients), and not again.
"""

from __future__ import annotations

import dataclasses
import sys
from types import CodeType
from typing import Any

import torch
from torch import Tensor, nn

from gradscope.recording.blocks import Block
from gradscope.recording.clock import StepClock
from gradscope.recording.compilation import python_when_entered
from gradscope.recording.copies import NotCopied
from gradscope.recording.layers import ExecutionOrder
from gradscope.recording.sink import Sink
from gradscope.recording.traced import (
    BATCH_NORMS,
    Staging,
    block_output,
    branch_from_tail,
    branch_output,
    layer_output,
    note_traced,
)
from gradscope.store.schema import B_GRAD_IN_SS, B_GRAD_OUT_SS, EVAL, TRAIN

_MAX_NESTING = 4
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _in_backward() -> bool:
    return _graph_task_id() != -1


FIRST, RECOMPUTE = "first", "recompute"  # the passes of a reentrant checkpoint (checkpoint_pass)


def _checkpoint_codes() -> tuple[CodeType | None, CodeType | None, frozenset[CodeType]]:
    """Code objects that mark where a checkpoint runs a forward: the reentrant ``CheckpointFunction``'s
    forward and backward, and the non-reentrant unpack hook that recomputes (absent ones: None)."""
    from torch.utils import checkpoint

    function = getattr(checkpoint, "CheckpointFunction", None)
    forward, backward = (getattr(getattr(function, name, None), "__code__", None) for name in ("forward", "backward"))
    init = getattr(getattr(checkpoint, "_checkpoint_hook", None), "__init__", None)
    consts = getattr(getattr(init, "__code__", None), "co_consts", ())
    unpack = frozenset(c for c in consts if isinstance(c, CodeType) and c.co_name == "unpack_hook")
    return forward, backward, unpack


_CHECKPOINT_FORWARD, _CHECKPOINT_BACKWARD, _NON_REENTRANT_RECOMPUTE = _checkpoint_codes()


def checkpoint_pass() -> str | None:
    """``FIRST`` inside a reentrant checkpoint's first forward (under no_grad; recomputed in
    backward, whose gradients reach its inputs), ``RECOMPUTE`` inside its recomputation in
    backward, None elsewhere (a non-reentrant recomputation included). The innermost checkpoint
    decides. A walk up the Python stack: called only for forwards without autograd or in backward.
    """
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code is _CHECKPOINT_FORWARD:
            ctx = frame.f_locals.get("ctx")
            return FIRST if any(getattr(ctx, "needs_input_grad", (True,))) else None
        if code is _CHECKPOINT_BACKWARD:
            return RECOMPUTE
        if code in _NON_REENTRANT_RECOMPUTE:
            return None
        frame = frame.f_back  # type: ignore[assignment]
    return None


def first_float_tensor(output: Any, _depth: int = 0) -> Tensor | None:
    """The first floating-point tensor in a module's output, searching containers in order.

    Handles tensors, tuples/lists/namedtuples, dicts (and Hugging Face ``ModelOutput``, a dict),
    and dataclasses. Integer and boolean tensors (indices, masks) are skipped.
    """
    if isinstance(output, Tensor):
        return output if output.is_floating_point() else None
    if _depth >= _MAX_NESTING or output is None:
        return None
    if isinstance(output, dict):
        items: Any = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = (getattr(output, f.name) for f in dataclasses.fields(output))
    else:
        return None
    for item in items:
        found = first_float_tensor(item, _depth + 1)
        if found is not None:
            return found
    return None


def on_gradient(t: Tensor, probe: Any) -> None:
    """Call ``probe(grad_outputs)`` when backward reaches the node that produced ``t``.

    The node's pre-hook sees the gradients of all its outputs, summed over their consumers;
    ``t``'s is at ``t.output_nr`` (None where no gradient reached it), which the probe was made
    with (``output_gradient`` reads it). The hook goes with the graph, like a tensor hook, and
    leaves the gradients untouched (it returns None).
    """
    t.grad_fn.register_prehook(probe)


def output_gradient(grad_outputs: tuple[Tensor | None, ...], index: int) -> Tensor | None:
    """dL/dt from a node pre-hook's gradients, for ``t`` its output number ``index``."""
    return grad_outputs[index] if index < len(grad_outputs) else None


class LayerProbe(NotCopied):
    """Forward hook of one watched module.

    On recorded steps it hands the output to the sink (its moments; on a GPU the ``Batcher`` may
    hold it and reduce it with others) and, in training, hooks the output for dL/dy. On other
    steps it returns after one attribute test, doing no tensor work.
    """

    __slots__ = ("clock", "sink", "order", "row", "bounds", "count_zeros", "staging", "feeds_branch")
    TABLE = "layers"  # whose row ``row`` is (``traced.note_traced``)

    def __init__(self, clock: StepClock, sink: Sink, order: ExecutionOrder, row: int,
                 bounds: tuple[float, float] | None, count_zeros: bool, staging: Staging) -> None:
        self.clock, self.sink, self.order = clock, sink, order
        self.row, self.bounds, self.count_zeros, self.staging = row, bounds, count_zeros, staging
        self.feeds_branch = False  # the last layer of a residual branch (``BranchProbe.tail``)

    @python_when_entered
    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        clock = self.clock  # a skipped AMP step ended before this (scaler.update(), or the model's pre-hook)
        grad_on = torch.is_grad_enabled()
        if grad_on:  # lets step(loss=) tell this step from the previous one
            clock.grad_forward_seen = True
        if torch.compiler.is_compiling():  # traced into a compiled model: every step, into the staging
            self._traced(module, inputs, output, grad_on)
            return
        if not clock.recording:
            return
        # Activation checkpointing recomputes forwards during backward: only a reentrant one's
        # training modules are measured there, and not in its first pass (see checkpoint_pass).
        if _in_backward():
            if not (grad_on and module.training and checkpoint_pass() is RECOMPUTE):
                return
        elif not grad_on and module.training and checkpoint_pass() is FIRST:
            self.order.note(self.row)  # its place in the network is here
            return
        y = first_float_tensor(output)
        if y is None or y.numel() == 0:
            return
        train = module.training and grad_on
        sink, row = self.sink, self.row
        slot = sink.slot()
        self.order.note(row)
        sink.activation(slot, TRAIN if train else EVAL, row, y, self.bounds, self.count_zeros)
        # Only non-leaf outputs: a hook on a leaf (a module returning a parameter) would outlive
        # the step and the recorder; a non-leaf's hook goes with its graph.
        if train and y.grad_fn is not None:
            on_gradient(y, GradientProbe(sink, row, clock.step, y.output_nr))

    def _traced(self, module: nn.Module, inputs: Any, output: Any, grad_on: bool) -> None:
        y = first_float_tensor(output)
        if y is None or y.numel() == 0:
            return
        note_traced(self)
        train = module.training and grad_on
        # a BatchNorm's inputs may stand for its output where no hook ran before this one (only there
        # are the hook dicts read: each read is a guard)
        derivable = type(module) in BATCH_NORMS and _first_forward_hook(module, self)
        layer_output(self.staging, TRAIN if train else EVAL, self.row, y, self.bounds, self.count_zeros, train,
                     module, inputs if derivable else (), self.feeds_branch)


#: torch's global forward hooks (they run before a module's own); None if a torch moves them
_GLOBAL_FORWARD_HOOKS = getattr(torch.nn.modules.module, "_global_forward_hooks", None)


def _first_forward_hook(module: nn.Module, probe: Any) -> bool:
    """Whether ``probe`` is the first forward hook to run on ``module``: no other hook can have
    replaced its output (gradscope's probes are prepended; a global hook or one prepended after
    ``watch()`` runs first). False where torch keeps its hooks elsewhere."""
    hooks = getattr(module, "_forward_hooks", None)
    if hooks is None or _GLOBAL_FORWARD_HOOKS is None or _GLOBAL_FORWARD_HOOKS:
        return False
    return next(iter(hooks.values()), None) is probe


class GradientProbe:
    """Gradient pre-hook of a layer's output node: ||dL/dy||^2 for the step it was made in."""

    __slots__ = ("sink", "row", "step", "index")

    def __init__(self, sink: Sink, row: int, step: int, index: int) -> None:
        self.sink, self.row, self.step, self.index = sink, row, step, index

    @python_when_entered
    def __call__(self, grad_outputs: tuple[Tensor | None, ...]) -> None:
        grad = output_gradient(grad_outputs, self.index)
        if grad is None:
            return
        slot = self.sink.slot_of(self.step)
        if slot is None:  # backward after the step was flushed or the recorder closed
            return
        self.sink.layer_gradient(slot, self.row, grad)


class BlockProbe(NotCopied):
    """Forward pre-hook and hook of one block: compares its output with its input.

    The pre-hook notes the input tensor and its version counter; the hook measures identity
    closeness against it, unless the block modified its input in place (then the input it
    saw is gone and the call is skipped). Gradient hooks (``on_gradient``) on the input and output give
    ||dL/dx|| and ||dL/dy||. Nothing is kept once the call returns.
    """

    __slots__ = ("clock", "sink", "order", "block", "row", "staging", "seq_first", "_inputs")
    TABLE = "blocks"

    def __init__(self, clock: StepClock, sink: Sink, order: ExecutionOrder, block: Block, module: nn.Module,
                 staging: Staging) -> None:
        self.clock, self.sink, self.order, self.block, self.staging = clock, sink, order, block, staging
        self.row = block.row
        # nn.TransformerEncoderLayer and friends default to [tokens, batch, dim]
        self.seq_first = getattr(getattr(module, "self_attn", None), "batch_first", True) is False
        # A stack (blocks may nest or recurse) with one entry per call, pushed even when not
        # recording, so a pre-hook and its hook always pair up; None where nothing was kept.
        self._inputs: list[tuple[Tensor, int] | None] = []

    def _active(self, module: nn.Module) -> bool:
        """A recorded training call: with autograd, not in backward but a reentrant checkpoint's
        recomputation (its first pass only notes the block's place)."""
        if not (self.clock.recording and module.training):
            return False
        if torch.is_grad_enabled():
            return not _in_backward() or checkpoint_pass() is RECOMPUTE
        if checkpoint_pass() is FIRST:
            self.order.note(self.block.row)
        return False

    @python_when_entered
    def before(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():  # the traced path takes x from the hook's args
            return
        x = first_float_tensor(args) if self._active(module) else None
        self._inputs.append((x, x._version) if x is not None else None)

    @python_when_entered
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            self._traced(module, args, output)
            return
        entry = self._inputs.pop() if self._inputs else None
        if entry is None or not self.clock.recording:  # (the model's pre-hook may end a step the optimizer skipped)
            return
        x, version = entry
        y = first_float_tensor(output)
        if y is None:
            return
        sink, block, row = self.sink, self.block, self.block.row
        slot = sink.slot()
        self.order.note(row)
        pair = False  # compared with the identity
        if x.shape != y.shape:
            if block.reason is None:
                block.reason = f"changes shape: {tuple(x.shape[1:])} -> {tuple(y.shape[1:])} per sample"
        elif x._version != version:
            if block.reason is None:
                block.reason = "modifies its input in place"
        else:
            pair = y.numel() > 0
        sink.block_call(slot, row)
        tokens = y.dim() == 3 and y.shape[1 - self.seq_first] > 1  # [batch, tokens, dim]
        if pair or tokens:
            # sequence-first [tokens, batch, dim] read as [batch, tokens, dim], without a copy
            xs, ys = (t.detach().transpose(0, 1) if self.seq_first and t.dim() == 3 else t.detach()
                      for t in (x, y))
            sink.block_terms(slot, row, xs if pair else None, ys, tokens)
        step = self.clock.step
        if x.grad_fn is not None:
            on_gradient(x, BlockGradientProbe(sink, row, step, B_GRAD_IN_SS, x.output_nr))
        elif x.requires_grad and _in_backward() and not isinstance(x, nn.Parameter):
            # a reentrant checkpoint's detached input (a leaf): the hook dies with it
            x.register_hook(BlockGradientProbe(sink, row, step, B_GRAD_IN_SS, 0).of_tensor)
        if y.grad_fn is not None:
            on_gradient(y, BlockGradientProbe(sink, row, step, B_GRAD_OUT_SS, y.output_nr))

    def _traced(self, module: nn.Module, args: Any, output: Any) -> None:
        """In a compiled graph: x from the hook's args (the pre-hook keeps nothing there)."""
        if not (module.training and torch.is_grad_enabled()):
            return
        x, y = first_float_tensor(args), first_float_tensor(output)
        if x is None or y is None:
            return
        note_traced(self)
        block_output(self.staging, self, self.row, x, y, self.seq_first)


class BlockEntry(NotCopied):
    """A block's forward pre-hook: its probe's ``before``, as an object (``copies``)."""

    __slots__ = ("probe",)

    def __init__(self, probe: BlockProbe) -> None:
        self.probe = probe

    @python_when_entered
    def __call__(self, module: nn.Module, args: Any) -> None:
        self.probe.before(module, args)


class BranchProbe(NotCopied):
    """Forward hook on a block's residual branch F: ||F(x)||^2 for branch_ratio.

    In a compiled graph, a branch that is an ``nn.Sequential`` returns its last layer's output,
    which that layer's probe has just measured (``tail``): the sum of squares comes from its
    moments, unless a hook may have replaced the output in between (``_returns_tail_output``).
    """

    __slots__ = ("clock", "sink", "row", "staging", "tail")

    def __init__(self, clock: StepClock, sink: Sink, row: int, staging: Staging,
                 tail: tuple[nn.Module, LayerProbe] | None = None) -> None:
        self.clock, self.sink, self.row, self.staging, self.tail = clock, sink, row, staging, tail

    @python_when_entered
    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling():
            f = first_float_tensor(output)
            if f is not None and module.training and torch.is_grad_enabled():
                if self.tail is not None and f.numel() > 0 and _returns_tail_output(module, self, *self.tail):
                    branch_from_tail(self.staging, self.row, self.tail[1].row, f)
                else:
                    branch_output(self.staging, self.row, f)
            return
        if not (self.clock.recording and module.training and torch.is_grad_enabled()):
            return
        if _in_backward() and checkpoint_pass() is not RECOMPUTE:
            return
        f = first_float_tensor(output)
        if f is None:
            return
        sink = self.sink
        sink.branch(sink.slot(), self.row, f.detach())


def sequential_tail(branch: nn.Module) -> nn.Module | None:
    """The module whose output ``branch`` returns, if ``branch`` is a plain ``nn.Sequential``
    (nested ones followed to their last module); None otherwise."""
    tail = branch
    while type(tail) is nn.Sequential and len(tail) and "forward" not in vars(tail):
        tail = tail[-1]
    return tail if tail is not branch else None


def _returns_tail_output(branch: nn.Module, probe: BranchProbe, tail: nn.Module, tail_probe: LayerProbe) -> bool:
    """Whether ``branch`` returned exactly the output ``tail_probe`` measured in this call: the
    branch is still a Sequential ending in ``tail``, no hook after the tail's probe (all gradscope's,
    which return None) and none before the branch's probe can have replaced it."""
    if sequential_tail(branch) is not tail or not _first_forward_hook(branch, probe):
        return False
    hooks = list(getattr(tail, "_forward_hooks", {}).values())
    return tail_probe in hooks and all(type(h) in _PASSIVE_HOOKS for h in hooks[hooks.index(tail_probe) + 1:])


class BlockGradientProbe:
    """Gradient pre-hook of a block's input or output node: the squared gradient norm."""

    __slots__ = ("sink", "row", "step", "column", "index")

    def __init__(self, sink: Sink, row: int, step: int, column: int, index: int) -> None:
        self.sink, self.row, self.step, self.column, self.index = sink, row, step, column, index

    @python_when_entered
    def __call__(self, grad_outputs: tuple[Tensor | None, ...]) -> None:
        grad = output_gradient(grad_outputs, self.index)
        if grad is None:
            return
        slot = self.sink.slot_of(self.step)
        if slot is None:
            return
        self.sink.block_gradient(slot, self.row, self.column, grad)

    @python_when_entered
    def of_tensor(self, grad: Tensor) -> None:
        """As a tensor hook (a reentrant checkpoint's detached input has no node to hook)."""
        self((grad,))


#: gradscope's forward hooks: they never return a value, so never replace a module's output
_PASSIVE_HOOKS = (LayerProbe, BlockProbe, BranchProbe)
