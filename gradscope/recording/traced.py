"""Probes inside a compiled model: statistics traced into the graph and kept in a staging buffer.

Under Dynamo a probe must not read a Python value that changes from step to step (the step, the
``every`` schedule, the host counts, the slot): each read becomes a guard, and the model would
recompile every step until Dynamo's cache limit. So where ``torch.compiler.is_compiling()`` the
probes take this path. Their statistics are ops of the traced graph (Inductor fuses them into the
kernels that produce the tensors, where those are its own rather than library calls) and land in
``Staging``, a fixed device buffer with device counts: several calls merge there by Chan's update
on the device, and dL/dy comes from a tensor hook traced into the backward, which hands its sum
to the staging through an opaque op (``deposits``: written directly, a model compiled into
several graphs failed in its backward). Outside the graph
the recorder folds the staging into the step's slot at a recorded step's end and zeroes it at
every step's end, so the schedule is data, never a guard. The formulas, written for what Inductor
makes of them, are in ``traced_statistics``; with ``every > 1`` on the CPU they run in ``gated``
ops, which skip them on the steps the schedule does not record.
What needs Python (a layer's place in the execution order, why a block is not compared with the
identity) runs once, while tracing (``note_traced``, ``explain_traced``).

What this path cannot see: a block that modifies its input in place but returns another tensor
(its input is read after the change).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from gradscope.recording import deposits, gated
from gradscope.recording.buffer import StatsBuffer, device_index
from gradscope.recording.compilation import note_unhooked
from gradscope.recording.device_counts import count_shapes, count_width
from gradscope.recording.traced_statistics import (
    batch_norm_statistics,
    branch_squares,
    gradient_squares,
    identity_sums,
    layer_statistics,
    token_cosine_sum,
)
from gradscope.store.schema import (
    ACT_ABSMAX,
    ACT_MEAN,
    ACT_VAR,
    ACTIVATION,
    B_BRANCH_SS,
    B_COS_SUM,
    B_DIFF_SS,
    B_GRAD_IN_SS,
    B_GRAD_OUT_SS,
    B_TOKEN_COS_SUM,
    BLOCK,
    GRAD_OUT_SS,
    LAYER,
    PHASES,
    TRAIN,
    merge_partial,
)


@torch.compiler.assume_constant_result
def note_traced(probe: Any) -> int:
    """While Dynamo traces ``probe`` (it takes the result as a constant and never replays the call,
    so nothing read here becomes a guard): the probe's row takes its place in the execution order,
    and the staging is in use. Only the probe is passed: a value read from it under Dynamo may be
    a lazy constant, which this call could not take. The row is marked traced on the host (its
    probe runs in every call of that graph): ``compilation.HookCheck`` reads which probes ran."""
    probe.order.note(probe.row)
    staging = probe.staging
    (staging.traced_blocks if probe.TABLE == "blocks" else staging.traced_layers)[probe.row] = True
    staging.used = True
    return 0


@torch.compiler.assume_constant_result
def explain_traced(probe: Any, before: Any = None, after: Any = None) -> int:
    """While Dynamo traces a block: why it is not compared with the identity (the first reason
    stays): it changes the shape ``before`` -> ``after`` per sample, or (without them) it returned
    its input, modified in place."""
    block = probe.block
    if block.reason is None:
        block.reason = (f"changes shape: {tuple(before)} -> {tuple(after)} per sample" if before is not None
                        else "modifies its input in place")
    return 0


class Staging:
    """One step's statistics measured by the traced probes, on the device, at fixed addresses."""

    def __init__(self, layers: int, blocks: int, device: torch.device, every: int = 1) -> None:
        self.layers, self.blocks = layers, blocks
        # read by the ``gated`` ops: whether this step is recorded, set between steps (None: not gated)
        self.gate = gated.Gate() if every > 1 and device.type == "cpu" and gated.AVAILABLE else None
        self.layer = torch.zeros(len(PHASES), layers, LAYER.width, device=device)
        self.block = torch.zeros(blocks, BLOCK.width, device=device)
        self.width = count_width(layers, blocks)
        self.counts = torch.zeros(self.width, dtype=torch.int64, device=device)
        for name, shape, offset, size in count_shapes(layers, blocks):
            setattr(self, name, self.counts[offset:offset + size].view(shape))
        # scratch, never folded: a branch's last layer's sum of squared outputs, written by its call
        # and read by the branch's probe right after (``branch_from_tail``)
        self.tail_squares = torch.zeros(layers, device=device)
        if device.type == "cuda":  # CUDA graphs (mode="reduce-overhead") replay writes to fixed addresses
            for t in (self.layer, self.block, self.counts, self.tail_squares):
                torch._dynamo.mark_static_address(t)
        self.used = False  # set while tracing: some probe was traced into a compiled graph
        self.traced_layers, self.traced_blocks = np.zeros(layers, bool), np.zeros(blocks, bool)  # which ones
        self.key = deposits.register(self)  # names it to ``gradscope::deposit`` in a compiled backward
        self._cells: dict[tuple[int, int], tuple[Tensor, Tensor | None, Tensor]] = {}

    def release(self, model: nn.Module) -> None:
        """The recorder closed and removed its hooks: a compiled graph still calling them deposits
        nothing, and a model they were traced into is noted (``compilation.note_unhooked``)."""
        deposits.release(self.key)
        if self.used:
            note_unhooked(model)

    def backward_cells(self, kind: int, row: int) -> tuple[Tensor, Tensor | None, Tensor]:
        """Where a backward hook's deposit goes (``deposits``): the sum of squares, the elements
        (a layer's only) and the calls; views, so they stay put through ``zero``."""
        cells = self._cells.get((kind, row))
        if cells is None:
            if kind == deposits.LAYER_GRAD_OUT:
                cells = (self.layer[TRAIN, row, GRAD_OUT_SS], self.grad_n[row], self.grad_calls[row])
            elif kind == deposits.BLOCK_GRAD_IN:
                cells = (self.block[row, B_GRAD_IN_SS], None, self.block_grad_in[row])
            else:
                cells = (self.block[row, B_GRAD_OUT_SS], None, self.block_grad_out[row])
            self._cells[(kind, row)] = cells
        return cells

    def merge_layer(self, phase: int, row: int, parts: list[Tensor], n: int, tail: bool = False) -> None:
        """A layer call's moments (``traced_statistics.layer_statistics``) merged into its cell by
        Chan's update against the calls already staged (``schema.merge_partial``, written out: Dynamo
        traces this once per layer, and the generic loop costs it several times as long). A
        branch's last layer (``tail``) also leaves ||y||^2 = n (var + mean^2) in the scratch."""
        mean, var, k = parts[0], parts[1], len(parts)
        if tail:
            self.tail_squares[row] = n * (var + mean * mean)
        cell, seen = self.layer[phase, row], self.act_n[phase, row]
        w_old = seen / (seen + n)
        w_new = 1 - w_old
        delta = mean - cell[ACT_MEAN]
        merged = [cell[ACT_MEAN] * w_old + mean * w_new,
                  cell[ACT_VAR] * w_old + var * w_new + delta * delta * (w_old * w_new),
                  torch.maximum(cell[ACT_ABSMAX], parts[2])]
        merged += [cell[ACT_MEAN + i] + parts[i] for i in range(3, k)]
        cell[ACT_MEAN:ACT_MEAN + k] = torch.stack(merged)
        seen += n
        self.act_calls[phase, row] += 1

    def add_block(self, row: int, identity: Tensor | None, token_cosines: Tensor | None, samples: int,
                  tokens: int) -> None:
        """A block call: its identity sums (``traced_statistics.identity_sums``) over ``samples``
        and its token cosine sum over ``tokens`` samples, each where measured."""
        self.block_calls[row] += 1
        if identity is not None:
            self.block[row, B_DIFF_SS:B_COS_SUM + 1] += identity
            self.block_samples[row] += samples
        if token_cosines is not None:
            self.block[row, B_TOKEN_COS_SUM] += token_cosines
            self.block_tokens[row] += tokens

    def add_branch(self, row: int, squares: Tensor) -> None:
        self.block[row, B_BRANCH_SS] += squares
        self.block_branch[row] += 1

    def holds_any(self) -> bool:
        """Whether some traced probe ran since the last step's end (waits for the device: at close only)."""
        return bool(self.counts.any())

    def saved(self) -> tuple[Tensor, Tensor, Tensor]:
        """Copies (on the device) to put back with ``restore``: around an analysis run mid-step."""
        return self.layer.clone(), self.block.clone(), self.counts.clone()

    def restore(self, copies: tuple[Tensor, Tensor, Tensor]) -> None:
        for t, copy in zip((self.layer, self.block, self.counts), copies):
            t.copy_(copy)

    def zero(self) -> None:
        """At every step's end (the traced probes run every step; only recorded ones are kept)."""
        self.layer.zero_()
        self.block.zero_()
        self.counts.zero_()

    def next_step(self, recording: bool) -> None:
        """A step ended: zeroed where a traced probe wrote, and the gate set for the next one (it
        stays open until a probe is traced: no tensor work in an eager model's unrecorded steps)."""
        if not self.used:
            return
        self.zero()
        if self.gate is not None:
            self.gate.open = recording

    def fold(self, buffer: StatsBuffer, slot: int) -> None:
        """Merge the staging into a recorded step's ``slot``, beside what the eager probes wrote there
        (a model may run both ways in one step); the counts go to the buffer's device counts, read
        at the flush."""
        host = buffer.counts
        dst, src = buffer.layer[slot], self.layer
        k = len(ACTIVATION)
        if host.act_n[slot].any():  # eager probes wrote some rows: merged (their counts copied without a wait)
            n_host = device_index(host.act_n[slot], dst.device)
            merged = torch.stack(merge_partial(ACTIVATION, dst[..., ACT_MEAN:k].unbind(-1),
                                               src[..., ACT_MEAN:k].unbind(-1), n_host, self.act_n), -1)
            # a row no eager probe wrote holds stale values: the staging's alone
            dst[..., ACT_MEAN:k] = torch.where((n_host > 0).unsqueeze(-1), merged, src[..., ACT_MEAN:k])
        else:
            dst[..., ACT_MEAN:k] = src[..., ACT_MEAN:k]
        grad_out, staged = dst[TRAIN, :, GRAD_OUT_SS], src[TRAIN, :, GRAD_OUT_SS]
        if host.grad_calls[slot].any():
            grad_out.copy_(torch.where(device_index(host.grad_calls[slot], dst.device) > 0, grad_out, 0) + staged)
        else:
            grad_out.copy_(staged)
        if self.blocks:
            buffer.block[slot] += self.block  # pure sums, zeroed when the slot opened
        buffer.device_counts_of(self.width)[slot] += self.counts


# ---------------------------------------------------------------------- what the traced probes measure


def layer_output(staging: Staging, phase: int, row: int, y: Tensor, bounds: tuple[float, float] | None,
                 count_zeros: bool, train: bool, module: nn.Module | None = None, inputs: Any = (),
                 tail: bool = False) -> None:
    """A watched layer's output ``y`` in a traced graph: its moments merged into the staging and,
    in training, a tensor hook for ||dL/dy||^2. The last layer of a residual branch (``tail``)
    also leaves ||y||^2 = n (var + mean^2) in the scratch, for the branch's probe."""
    yd = y.detach()
    if gated.applies(staging, yd):
        gated.layer_output(staging, phase, row, yd, count_zeros, bounds)
    else:
        x = normalised_input(module, inputs, yd) if not count_zeros and bounds is None else None
        if x is not None:
            parts = batch_norm_statistics(x, module.weight, module.bias, module.eps)  # type: ignore[union-attr]
        else:
            parts = layer_statistics(yd, count_zeros, bounds)
        staging.merge_layer(phase, row, parts, yd.numel(), tail)
    if train and y.requires_grad and not y.is_leaf:
        # a convolution's backward (a library call) reads dL/dy: only the loop that wrote it can take the sum
        into_producer = isinstance(module, _ConvNd) and y.dim() == 4 and y.device.type == "cpu"
        y.register_hook(_squares_into(staging, deposits.LAYER_GRAD_OUT, row, into_producer))


#: Exactly these types (a subclass may change the forward): their outputs' statistics come from
#: their inputs in training (``traced_statistics.batch_norm_statistics``).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def normalised_input(module: nn.Module | None, inputs: Any, y: Tensor) -> Tensor | None:
    """The float32 input of a BatchNorm that normalises ``y`` by the batch's own moments (in
    training, or without running statistics), else None. ``inputs`` is empty where a hook that ran
    before the probe may have replaced the output (``LayerProbe``)."""
    if type(module) not in BATCH_NORMS:
        return None
    if not (module.training or (module.running_mean is None and module.running_var is None)):  # type: ignore[union-attr]
        return None
    x = inputs[0] if isinstance(inputs, tuple) and inputs and isinstance(inputs[0], Tensor) else None
    if x is None or x.dtype != torch.float32 or y.dtype != torch.float32 or x.shape != y.shape or x.dim() < 2:
        return None
    return x.detach()


def block_output(staging: Staging, probe: Any, row: int, x: Tensor, y: Tensor, seq_first: bool) -> None:
    """A block call in a traced graph: compared with the identity where ``y`` has ``x``'s shape
    (else the reason is noted while tracing), token cosines, and hooks for dL/dx and dL/dy."""
    pair = False
    if x.shape != y.shape:
        explain_traced(probe, x.shape[1:], y.shape[1:])
    elif y is x:
        explain_traced(probe)
    else:
        pair = y.numel() > 0
    tokens = y.dim() == 3 and y.shape[1 - seq_first] > 1
    xs, ys = (t.detach().transpose(0, 1) if seq_first and t.dim() == 3 else t.detach() for t in (x, y))
    if gated.applies(staging, ys):
        gated.block_output(staging, row, xs, ys, pair, tokens)
    else:
        staging.add_block(row, identity_sums(xs, ys) if pair else None, token_cosine_sum(ys) if tokens else None,
                          xs.shape[0] if xs.dim() else 1, ys.shape[0])
    if x.requires_grad and not x.is_leaf and y is not x:
        x.register_hook(_squares_into(staging, deposits.BLOCK_GRAD_IN, row))
    if y.requires_grad and not y.is_leaf:
        y.register_hook(_squares_into(staging, deposits.BLOCK_GRAD_OUT, row))


def branch_output(staging: Staging, row: int, f: Tensor) -> None:
    """A block's residual-branch output F(x) in a traced graph: ||F(x)||^2."""
    fd = f.detach()
    if gated.applies(staging, fd):
        gated.branch_output(staging, row, fd)
    else:
        staging.add_branch(row, branch_squares(fd))


def branch_from_tail(staging: Staging, row: int, tail_row: int, f: Tensor) -> None:
    """``branch_output`` for a branch whose output ``f`` is its last layer's, as that layer's probe
    just measured it: ||F(x)||^2 from the layer's moments. Reading F(x) again would make Inductor
    write a BatchNorm's output to memory, where it otherwise computes it inside the residual add's
    loop. (The gated ops read ``f``: see ``gated.branch_output``.)"""
    if gated.applies(staging, f):
        branch_output(staging, row, f)
    else:
        staging.add_branch(row, staging.tail_squares[tail_row])


def _squares_into(staging: Staging, kind: int, row: int, into_producer: bool = False) -> Callable[[Tensor], None]:
    """A tensor hook depositing ||grad||^2 (and the element and call counts) in the staging's
    ``kind`` cells of ``row`` (``deposits``: not written directly, which breaks a model compiled
    into several graphs); returns None, so the gradient passes on untouched."""
    def hook(grad: Tensor) -> None:
        g = grad.detach()
        if gated.applies(staging, g):
            gated.gradient(staging, kind, row, g)
        else:
            deposits.deposit(staging, kind, row, gradient_squares(g, into_producer), g.numel())

    return hook
