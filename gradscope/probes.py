"""What is measured where: forward hooks on watched modules and gradient hooks on their outputs.

Probes are observers. They run their statistics under ``no_grad`` so nothing joins the user's
graph, never return a value (so outputs and gradients pass through untouched), and hold no
tensor past the call. The gradient flowing back through a layer, dL/dy, is taken with a pre-hook
on the autograd node that produced the output (``on_gradient``) rather than
``register_full_backward_hook``: a module backward hook wraps the output in a view that
``ReLU(inplace=True)`` then fails to modify, while the producing node receives exactly the
gradient of the tensor as the layer produced it, whatever in-place op follows. (A tensor hook
has the same meaning but costs three times as much to register, hundreds of times per step.)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from gradscope.stats import (
    B_BRANCH_SS,
    B_GRAD_IN_SS,
    B_GRAD_OUT_SS,
    EVAL,
    GRAD_OUT_SS,
    TRAIN,
    accumulate_square,
    activation_moments,
    merge_activation_,
)

if TYPE_CHECKING:
    from gradscope.recorder import Recorder

_MAX_NESTING = 4
_graph_task_id = getattr(torch._C, "_current_graph_task_id", lambda: -1)


def _in_backward() -> bool:
    return _graph_task_id() != -1


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


class LayerProbe:
    """Forward hook of one watched module.

    On recorded steps it computes the output's moments (the recorder writes them into its buffer
    row, for all layers at once; on a GPU the ``Batcher`` may hold the output and reduce it with
    others) and, in training, hooks the output for dL/dy. On other steps it returns after one
    attribute test, doing no tensor work.
    """

    __slots__ = ("rec", "row", "bounds", "count_zeros")

    def __init__(self, rec: "Recorder", row: int, bounds: tuple[float, float] | None, count_zeros: bool) -> None:
        self.rec, self.row, self.bounds, self.count_zeros = rec, row, bounds, count_zeros

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        rec = self.rec  # skipped AMP steps are detected by the recorder's model pre-hook, before this
        grad_on = torch.is_grad_enabled()
        if grad_on:  # lets step(loss=) tell this step from the previous one
            rec._grad_forward_seen = True
        if not rec._recording:
            return
        if _in_backward():  # activation checkpointing recomputes forwards during backward
            return
        y = first_float_tensor(output)
        if y is None or y.numel() == 0:
            return
        row, n = self.row, y.numel()
        train = module.training and grad_on
        phase = TRAIN if train else EVAL
        slot = rec._open_slot()
        rec._note_execution(row)
        counts = rec._counts
        seen = counts.act_n[slot, phase, row]
        batcher = rec._batcher
        if seen:  # the module ran again in this step: merge the calls (the first must be written,
            # and the batcher may drop it there if it was held and then changed in place)
            rec._commit_moments()
            seen = counts.act_n[slot, phase, row]
        if seen == 0 and batcher is not None and batcher.hold_output(y, slot, phase, row):
            pass  # held, and reduced with the others' when the forward ends
        elif seen == 0 and batcher is not None and batcher.reduce_now(y.detach(), slot, phase, row):
            batcher.learn(row, y)  # one launch now; held from the next step if it survives
        elif seen == 0:  # (or no batcher can read y) written with every layer's at the step's end
            # y is detached, so no autograd graph is recorded (cheaper than entering no_grad)
            parts = activation_moments(y.detach(), self.bounds, self.count_zeros, rec._scratch)
            rec._pending_moments.append((slot, rec._layer_offset(0, phase, row), parts))
        else:
            parts = activation_moments(y.detach(), self.bounds, self.count_zeros, rec._scratch)
            dst = rec._buffer_view(False, rec._layer_offset(slot, phase, row), len(parts))
            merge_activation_(dst, torch.stack(parts), int(seen), n)
        counts.act_n[slot, phase, row] += n
        counts.act_calls[slot, phase, row] += 1
        # Only non-leaf outputs: a hook on a leaf (a module returning a parameter) would outlive
        # the step and the recorder; a non-leaf's hook goes with its graph.
        if train and y.grad_fn is not None:
            on_gradient(y, GradientProbe(rec, row, rec.step_index, y.output_nr))


class GradientProbe:
    """Gradient pre-hook of a layer's output node: accumulates ||dL/dy||^2 for the step it was made in."""

    __slots__ = ("rec", "row", "step", "index")

    def __init__(self, rec: "Recorder", row: int, step: int, index: int) -> None:
        self.rec, self.row, self.step, self.index = rec, row, step, index

    def __call__(self, grad_outputs: tuple[Tensor | None, ...]) -> None:
        grad = output_gradient(grad_outputs, self.index)
        if grad is None:
            return
        rec = self.rec
        slot = rec._slots.get(self.step)
        if slot is None or rec._closed:  # backward after the step was flushed or the recorder closed
            return
        counts = rec._counts
        rec._capture_loss_scale(slot)  # the scale this backward ran with
        rec._add_square(rec._layer_offset(slot, TRAIN, self.row) + GRAD_OUT_SS, grad,
                        first=counts.grad_calls[slot, self.row] == 0)
        counts.grad_n[slot, self.row] += grad.numel()
        counts.grad_calls[slot, self.row] += 1


class BlockProbe:
    """Forward pre-hook and hook of one block: compares its output with its input.

    The pre-hook notes the input tensor and its version counter; the hook measures identity
    closeness against it, unless the block modified its input in place (then the input it
    saw is gone and the call is skipped). Gradient hooks (``on_gradient``) on the input and output give
    ||dL/dx|| and ||dL/dy||. Nothing is kept once the call returns.
    """

    __slots__ = ("rec", "row", "seq_first", "_inputs")

    def __init__(self, rec: "Recorder", row: int, module: nn.Module) -> None:
        self.rec, self.row = rec, row
        # nn.TransformerEncoderLayer and friends default to [tokens, batch, dim]
        self.seq_first = getattr(getattr(module, "self_attn", None), "batch_first", True) is False
        # A stack (blocks may nest or recurse) with one entry per call, pushed even when not
        # recording, so a pre-hook and its hook always pair up; None where nothing was kept.
        self._inputs: list[tuple[Tensor, int] | None] = []

    def _active(self, module: nn.Module) -> bool:
        rec = self.rec
        return rec._recording and module.training and torch.is_grad_enabled() and not _in_backward()

    def before(self, module: nn.Module, args: Any) -> None:
        x = first_float_tensor(args) if self._active(module) else None
        self._inputs.append((x, x._version) if x is not None else None)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        entry = self._inputs.pop() if self._inputs else None
        if entry is None or not self._active(module):
            return
        x, version = entry
        y = first_float_tensor(output)
        if y is None:
            return
        rec, row = self.rec, self.row
        slot = rec._open_slot()
        rec._note_block_execution(row)
        counts = rec._counts
        counts.block_calls[slot, row] += 1
        block = rec.blocks[row]
        pair = False  # compared with the identity
        if x.shape != y.shape:
            if block.reason is None:
                block.reason = f"changes shape: {tuple(x.shape[1:])} -> {tuple(y.shape[1:])} per sample"
        elif x._version != version:
            if block.reason is None:
                block.reason = "modifies its input in place"
        else:
            pair = y.numel() > 0
        tokens = y.dim() == 3 and y.shape[1 - self.seq_first] > 1  # [batch, tokens, dim]
        if pair or tokens:
            # sequence-first [tokens, batch, dim] read as [batch, tokens, dim], without a copy
            xs, ys = (t.detach().transpose(0, 1) if self.seq_first and t.dim() == 3 else t.detach()
                      for t in (x, y))
            # per-sample terms now; the recorder sums them for all blocks at once at the step's end
            squares, sums = rec._block_terms(xs if pair else None, ys, tokens)
            if squares is not None:
                rec._pending_identity.append((slot, row, squares))
                counts.block_samples[slot, row] += xs.shape[0] if xs.dim() else 1
            if sums is not None:
                rec._pending_tokens.append((slot, row, (sums, ys.shape[1])))
                counts.block_tokens[slot, row] += ys.shape[0]
        if x.grad_fn is not None:
            on_gradient(x, BlockGradientProbe(rec, row, rec.step_index, B_GRAD_IN_SS, x.output_nr))
        if y.grad_fn is not None:
            on_gradient(y, BlockGradientProbe(rec, row, rec.step_index, B_GRAD_OUT_SS, y.output_nr))


class BranchProbe:
    """Forward hook on a block's residual branch F: accumulates ||F(x)||^2 for branch_ratio."""

    __slots__ = ("rec", "row")

    def __init__(self, rec: "Recorder", row: int) -> None:
        self.rec, self.row = rec, row

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        rec = self.rec
        if not (rec._recording and module.training and torch.is_grad_enabled()) or _in_backward():
            return
        f = first_float_tensor(output)
        if f is None:
            return
        slot = rec._open_slot()
        counts = rec._counts
        # F(x) is often modified in place next (out += x), so on the CPU it is reduced now; on a
        # GPU the batcher holds it only where that was seen not to happen (the block's buffer
        # row starts at zero, so both paths add)
        offset = rec._block_offset(slot, self.row) + B_BRANCH_SS
        batcher, f = rec._batcher, f.detach()
        if batcher is None or not batcher.branch_square(self.row, rec._block_base + offset, slot, f):
            accumulate_square(rec._buffer_view(True, offset), f, first=counts.block_branch[slot, self.row] == 0)
        counts.block_branch[slot, self.row] += 1


class BlockGradientProbe:
    """Gradient pre-hook of a block's input or output node: accumulates the squared gradient norm."""

    __slots__ = ("rec", "row", "step", "column", "index")

    def __init__(self, rec: "Recorder", row: int, step: int, column: int, index: int) -> None:
        self.rec, self.row, self.step, self.column, self.index = rec, row, step, column, index

    def __call__(self, grad_outputs: tuple[Tensor | None, ...]) -> None:
        grad = output_gradient(grad_outputs, self.index)
        if grad is None:
            return
        rec = self.rec
        slot = rec._slots.get(self.step)
        if slot is None or rec._closed:
            return
        rec._capture_loss_scale(slot)
        seen = rec._counts.block_grad_in if self.column == B_GRAD_IN_SS else rec._counts.block_grad_out
        rec._add_square(rec._block_base + rec._block_offset(slot, self.row) + self.column, grad,
                        first=seen[slot, self.row] == 0)
        seen[slot, self.row] += 1
