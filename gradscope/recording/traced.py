"""Probes inside a compiled model: statistics traced into the graph and kept in a staging buffer.

Under Dynamo a probe must not read a Python value that changes from step to step (the step, the
``every`` schedule, the host counts, the slot): each read becomes a guard, and the model would
recompile every step until Dynamo's cache limit. So where ``torch.compiler.is_compiling()`` the
probes take this path. Their statistics are ops of the traced graph (Inductor fuses them into the
kernels that produce the tensors, where those are its own rather than library calls) and land in
``Staging``, a fixed device buffer with device counts: several calls merge there by Chan's update
on the device, and dL/dy comes from a tensor hook traced into the backward. Outside the graph
the recorder folds the staging into the step's slot at a recorded step's end and zeroes it at
every step's end, so the schedule is data, never a guard.
The formulas are chosen for what Inductor makes of them on the CPU: the shifted one-pass moments
(plain sums about four times as fast as its Welford loop), feature maps summed per channel first
(Inductor then puts a conv output's statistics in BatchNorm's own loop over it), and per-sample
sums over a sample's dims rather than a flattened view (a channels-last tensor read in memory order),
and on the CPU gradient norms other than feature maps' read by an opaque op (``_gradient_squares``).
What needs Python (a layer's place in the execution order, why a block is not compared with the
identity) runs once, while tracing (``note_traced``, ``explain_traced``).

What this path cannot see: a block that modifies its input in place but returns another tensor
(its input is read after the change), and the forwards that activation checkpointing recomputes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradscope.recording.buffer import StatsBuffer, device_index
from gradscope.recording.device_counts import count_shapes, count_width
from gradscope.recording.identity import identity_terms, sample_squares, token_cosines, token_direction_sums
from gradscope.recording.moments import norm32, saturated, shift_of, shifted_variance
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
    a lazy constant, which this call could not take."""
    probe.order.note(probe.row)
    probe.staging.used = True
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

    def __init__(self, layers: int, blocks: int, device: torch.device) -> None:
        self.layers, self.blocks = layers, blocks
        self.layer = torch.zeros(len(PHASES), layers, LAYER.width, device=device)
        self.block = torch.zeros(blocks, BLOCK.width, device=device)
        self.width = count_width(layers, blocks)
        self.counts = torch.zeros(self.width, dtype=torch.int64, device=device)
        for name, shape, offset, size in count_shapes(layers, blocks):
            setattr(self, name, self.counts[offset:offset + size].view(shape))
        if device.type == "cuda":  # CUDA graphs (mode="reduce-overhead") replay writes to fixed addresses
            for t in (self.layer, self.block, self.counts):
                torch._dynamo.mark_static_address(t)
        self.used = False  # set while tracing: some probe was traced into a compiled graph

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
        """At every step's end (the traced probes measure every step; only recorded ones are kept)."""
        self.layer.zero_()
        self.block.zero_()
        self.counts.zero_()

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
                 count_zeros: bool, train: bool) -> None:
    """A watched layer's output ``y`` in a traced graph: its moments merged into the staging and,
    in training, a tensor hook for ||dL/dy||^2."""
    yd = y.detach()
    yf = yd if yd.dtype == torch.float32 else yd.float()
    mean, var = _shifted_moments(yf)
    parts = [mean, var, _amax(yf.abs())]
    if count_zeros or bounds is not None:
        parts.append(_sum(yd != 0).float() if count_zeros else mean)
    if bounds is not None:
        parts.append(saturated(yd, bounds))
    n, k = yd.numel(), len(parts)
    cell, seen = staging.layer[phase, row], staging.act_n[phase, row]
    # Chan's update against the calls already staged (``schema.merge_partial``, written out: Dynamo
    # traces this once per layer, and the generic loop costs it several times as long)
    w_old = seen / (seen + n)
    w_new = 1 - w_old
    delta = mean - cell[ACT_MEAN]
    merged = [cell[ACT_MEAN] * w_old + mean * w_new,
              cell[ACT_VAR] * w_old + var * w_new + delta * delta * (w_old * w_new),
              torch.maximum(cell[ACT_ABSMAX], parts[2])]
    merged += [cell[ACT_MEAN + i] + parts[i] for i in range(3, k)]
    cell[ACT_MEAN:ACT_MEAN + k] = torch.stack(merged)
    seen += n
    staging.act_calls[phase, row] += 1
    if train and y.requires_grad and not y.is_leaf:
        y.register_hook(_squares_into(staging.layer[TRAIN, row, GRAD_OUT_SS], staging.grad_n[row],
                                      staging.grad_calls[row]))


def _shifted_moments(y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population variance by the shifted one-pass formula (``moments.shift_of``): plain
    sums, which Inductor's CPU kernels take about four times as fast as a Welford ``var_mean``."""
    n = y.numel()
    c = shift_of(y.reshape(-1))
    d = y - c
    m1 = _sum(d) / n
    return m1 + c, shifted_variance(m1, _sum(d * d) / n)


def _sum(t: Tensor) -> Tensor:
    """The sum of ``t`` (int64 for bools); a conv feature map [N, C, ...] is summed per channel
    first, as BatchNorm reduces, so Inductor takes both in one loop over it in memory order."""
    return t.sum((0, *range(2, t.dim()))).sum() if t.dim() >= 4 else t.sum()


def _amax(t: Tensor) -> Tensor:
    """``t.amax()``, per channel first as ``_sum``."""
    return t.amax((0, *range(2, t.dim()))).amax() if t.dim() >= 4 else t.amax()


def _sample_squares(x: Tensor, y: Tensor) -> Tensor:
    """``identity.sample_squares`` as sums over the sample's own dims rather than a flattened
    view: Inductor then reads a channels-last tensor in its memory order."""
    if x.dim() < 2:
        return sample_squares(x, y)
    dims = tuple(range(1, x.dim()))
    xf, yf = x.float(), y.float()
    diff = yf - xf
    return torch.stack([(diff * diff).sum(dims), (xf * xf).sum(dims), (yf * yf).sum(dims)])


def block_output(staging: Staging, probe: Any, row: int, x: Tensor, y: Tensor, seq_first: bool) -> None:
    """A block call in a traced graph: compared with the identity where ``y`` has ``x``'s shape
    (else the reason is noted while tracing), token cosines, and hooks for dL/dx and dL/dy."""
    staging.block_calls[row] += 1
    pair = False
    if x.shape != y.shape:
        explain_traced(probe, x.shape[1:], y.shape[1:])
    elif y is x:
        explain_traced(probe)
    else:
        pair = y.numel() > 0
    tokens = y.dim() == 3 and y.shape[1 - seq_first] > 1
    xs, ys = (t.detach().transpose(0, 1) if seq_first and t.dim() == 3 else t.detach() for t in (x, y))
    if pair:
        terms = identity_terms(_sample_squares(xs, ys))  # [samples, 3]
        staging.block[row, B_DIFF_SS:B_COS_SUM + 1] += terms.sum(0)
        staging.block_samples[row] += xs.shape[0] if xs.dim() else 1
    if tokens:
        norms = torch.linalg.vector_norm(token_direction_sums(ys), dim=-1)
        staging.block[row, B_TOKEN_COS_SUM] += token_cosines(norms, ys.shape[1]).sum()
        staging.block_tokens[row] += ys.shape[0]
    if x.requires_grad and not x.is_leaf and y is not x:
        x.register_hook(_squares_into(staging.block[row, B_GRAD_IN_SS], None, staging.block_grad_in[row]))
    if y.requires_grad and not y.is_leaf:
        y.register_hook(_squares_into(staging.block[row, B_GRAD_OUT_SS], None, staging.block_grad_out[row]))


def branch_output(staging: Staging, row: int, f: Tensor) -> None:
    """A block's residual-branch output F(x) in a traced graph: ||F(x)||^2."""
    ff = f.detach()
    ff = ff if ff.dtype == torch.float32 else ff.float()
    staging.block[row, B_BRANCH_SS] += _sum(ff.square())
    staging.block_branch[row] += 1


def _gradient_squares(g: Tensor) -> Tensor:
    """||g||^2 of a gradient in a traced backward. Fused, Inductor recomputes the elementwise op
    that made ``g`` in a loop of its own (a ReLU's backward, reading its mask again: 1.8 ms per
    million elements on the CPU, against about 0.15 ms to read ``g`` once); so on the CPU ``g``
    is read by an opaque call, except for feature maps, whose per-channel sums Inductor puts in
    BatchNorm's backward loop (measured faster still). CUDA keeps the fused form (unmeasured)."""
    if squared_norm is not None and g.device.type == "cpu" and g.dim() < 4:
        return squared_norm(g)
    return _sum((g if g.dtype == torch.float32 else g.float()).square())


def _squared_norm(t: Tensor) -> Tensor:
    """||t||^2 as a float32 scalar: an opaque call in a compiled graph, which Inductor cannot fuse."""
    return norm32(t).square()


squared_norm: Any = None
if hasattr(torch.library, "custom_op"):  # torch >= 2.4; before it, the fused form
    squared_norm = torch.library.custom_op("gradscope::squared_norm", _squared_norm, mutates_args=())
    squared_norm.register_fake(lambda t: t.new_empty((), dtype=torch.float32))


def _squares_into(total: Tensor, elements: Tensor | None, calls: Tensor) -> Callable[[Tensor], None]:
    """A tensor hook adding ||grad||^2 to ``total`` (and the element and call counts); returns None,
    so the gradient passes on untouched."""
    def hook(grad: Tensor) -> None:
        g = grad.detach()
        total.add_(_gradient_squares(g))
        if elements is not None:
            elements.add_(g.numel())
        calls.add_(1)

    return hook
