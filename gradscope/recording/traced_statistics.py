"""What the traced probes compute, written for what Inductor makes of it on the CPU.

The formulas are the eager probes' (``moments``, ``identity``), arranged so that Inductor fuses
them into the kernels that produce the tensors: the shifted one-pass moments (plain sums, about
four times as fast as its Welford loop), feature maps summed per channel first (Inductor then puts
a conv output's statistics in BatchNorm's own loop over it), per-sample sums over a sample's dims
rather than a flattened view (a channels-last tensor read in memory order), a training
BatchNorm's output statistics from its input (``batch_norm_statistics``: no pass over the output),
and on the CPU gradient norms other than feature maps' read by an opaque op (``gradient_squares``).
Nothing here may put a guard on a size (``_traced_shift``, ``_accumulation``): a batch or sequence
length that changes would recompile the model at each new range of lengths.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gradscope.recording.identity import identity_terms, sample_squares, token_cosines, token_direction_sums
from gradscope.recording.moments import SHIFT_SAMPLES, norm32, saturated, shifted_variance


def layer_statistics(y: Tensor, count_zeros: bool, bounds: tuple[float, float] | None) -> list[Tensor]:
    """A layer output's mean, variance and max |y|, then (where asked) its non-zero count (else
    the mean again, a placeholder) and its saturated count: float32 scalars."""
    yf = y if y.dtype == torch.float32 else y.float()
    mean, var = shifted_moments(yf)
    parts = [mean, var, _amax(yf.abs())]
    if count_zeros or bounds is not None:
        parts.append(_sum(y != 0).float() if count_zeros else mean)
    if bounds is not None:
        parts.append(saturated(y, bounds))
    return parts


def batch_norm_statistics(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> list[Tensor]:
    """``layer_statistics`` of a BatchNorm's output in training, from its input ``x``: the output
    is x per channel times a plus b (a = weight / sqrt(var + eps), b = bias - a * mean, from the
    batch's own moments), so its channels' means and variances are a * mean + b and a^2 * var, and
    its largest |y| is at a channel's max or min of ``x``. All are reductions over ``x`` per
    channel, which Inductor takes in the loop where BatchNorm reduces it: no pass over the output
    (there, measured 0.03 of a resnet20 step). Float32 ``x`` only."""
    dims = (0, *range(2, x.dim()))
    var, mean = torch.var_mean(x, dims, correction=0)
    a = torch.rsqrt(var + eps)
    if weight is not None:
        a = a * weight.detach()
    b = -a * mean if bias is None else bias.detach() - a * mean
    means, variances = a * mean + b, a * a * var
    overall = means.mean()
    spread = means - overall
    peak = torch.maximum((a * x.amax(dims) + b).abs(), (a * x.amin(dims) + b).abs()).amax()
    return [overall, variances.mean() + (spread * spread).mean(), peak]


def shifted_moments(y: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population variance by the shifted one-pass formula (``moments.shift_of``): plain
    sums, which Inductor's CPU kernels take about four times as fast as a Welford ``var_mean``."""
    n = y.numel()
    c = _traced_shift(y.reshape(-1))
    d = y - c
    m1 = _sum(d) / n
    return m1 + c, shifted_variance(m1, _sum(d * d) / n)


def _traced_shift(flat: Tensor) -> Tensor:
    """``moments.shift_of`` (the same elements where SHIFT_SAMPLES divides the size) without a
    guard on the size: its ``max`` and slice would pin a dynamic batch or sequence length to a range
    (for a watched layer of 4 features, 32 to 256 samples), and every length outside it would
    recompile the model, up to Dynamo's cache limit. The indices i * n // SHIFT_SAMPLES are < n for
    any n > 0, whatever n is, so they are an op of the graph rather than a guard (an empty tensor:
    NaN, as ``shift_of``; Dynamo specialises a size of 0 anyway)."""
    n = flat.numel()
    if n == 0:
        return flat.mean()
    at = torch.arange(SHIFT_SAMPLES, device=flat.device) * n // SHIFT_SAMPLES
    return flat[at].mean()


def _sum(t: Tensor) -> Tensor:
    """The sum of ``t`` (int64 for bools, float32 for floats); a conv feature map [N, C, ...] is
    summed per channel first, as BatchNorm reduces, so Inductor takes both in one loop over it in
    memory order. On the CPU, in a graph with a symbolic size, floats are accumulated in float64
    (``_accumulation``)."""
    acc = _accumulation(t)
    s = t.sum((0, *range(2, t.dim())), dtype=acc).sum() if t.dim() >= 4 else t.sum(dtype=acc)
    return s if acc is None else s.float()


def _accumulation(t: Tensor) -> torch.dtype | None:
    """float64 for a float sum on the CPU in a graph with symbolic sizes, else None (the sum's own
    dtype). Inductor's C++ code accumulates a float32 sum over more than 4096 elements in chunks,
    and where the size is symbolic it guards that choice: every batch or sequence length across a
    threshold (for the reductions of a small LM, lengths 2, 4, 8, 32) would recompile the model, up
    to Dynamo's cache limit. A float64 sum has no such choice. Static sizes keep float32: the
    choice is then made once, and float64 made the statistics' loops more than twice as slow on an
    AVX-512 machine (resnet20, 2 threads: 16.7 ms a step against 7 ms)."""
    if t.device.type != "cpu" or not t.is_floating_point():
        return None
    return torch.float64 if _symbolic_sizes() else None


@torch.compiler.assume_constant_result
def _symbolic_sizes() -> bool:
    """Whether the graph being traced has a symbolic size: Dynamo made a tensor's length dynamic
    after seeing a second one (or ``dynamic=True``), or an int argument that may size tensors.
    Dynamo runs this at each call while tracing and puts the answer in the graph as a constant,
    with no guard. It reads the integer symbols of the tracing context's shape environment (a
    tensor's size symbols exist before the tensor does), except those of ``.item()`` of a tensor,
    such as a BatchNorm's ``num_batches_tracked``, read as an int in every graph with a BatchNorm
    in training, static or not; a float argument that changes is a symbol too, but sizes nothing.
    Those are torch internals: where they differ, True, the choice that never recompiles."""
    try:
        context = torch._guards.TracingContext.try_get()
        if context is None:  # not tracing: no guard to avoid
            return False
        env = context.fake_mode.shape_env
        if env is None:
            return False
        from torch._dynamo.source import CallMethodItemSource

        return any(symbol.is_integer and not isinstance(source, CallMethodItemSource)
                   for symbol, sources in env.var_to_sources.items() for source in sources)
    except Exception:
        return True


def _amax(t: Tensor) -> Tensor:
    """``t.amax()``, per channel first as ``_sum``."""
    return t.amax((0, *range(2, t.dim()))).amax() if t.dim() >= 4 else t.amax()


def identity_sums(x: Tensor, y: Tensor) -> Tensor:
    """[3] float32: ||y - x||^2, ||x||^2 and cos(x, y), each summed over the samples."""
    return identity_terms(_sample_squares(x, y)).sum(0)


def _sample_squares(x: Tensor, y: Tensor) -> Tensor:
    """``identity.sample_squares`` as sums over the sample's own dims rather than a flattened
    view: Inductor then reads a channels-last tensor in its memory order."""
    if x.dim() < 2:
        return sample_squares(x, y)
    dims = tuple(range(1, x.dim()))
    xf, yf = x.float(), y.float()
    diff = yf - xf
    acc = _accumulation(xf)
    sums = torch.stack([(t * t).sum(dims, dtype=acc) for t in (diff, xf, yf)])
    return sums if acc is None else sums.float()


def token_cosine_sum(y: Tensor) -> Tensor:
    """The mean pairwise cosine between the tokens of each sample of ``y`` [batch, tokens, dim],
    summed over the samples (float32 scalar)."""
    return token_cosines(torch.linalg.vector_norm(token_direction_sums(y), dim=-1), y.shape[1]).sum()


def branch_squares(f: Tensor) -> Tensor:
    """||F(x)||^2 of a residual branch's output."""
    return _sum((f if f.dtype == torch.float32 else f.float()).square())


def gradient_squares(g: Tensor, into_producer: bool = False) -> Tensor:
    """||g||^2 of a gradient in a traced backward. Fused, Inductor recomputes the elementwise op
    that made ``g`` in a loop of its own (a ReLU's backward, reading its mask again: 1.8 ms per
    million elements on the CPU, against about 0.15 ms to read ``g`` once); so on the CPU ``g``
    is read by an opaque call, except for feature maps, whose per-channel sums Inductor puts in
    BatchNorm's backward loop (measured faster still). CUDA keeps the fused form (unmeasured).
    ``into_producer`` (a convolution's output on the CPU): its consumer, the convolution's backward,
    is a library call, so only the loop that wrote ``g`` (BatchNorm's backward) can take the sum. A
    feature map is then summed over its channels first: channels-last (Inductor's layout for
    convolutions) Inductor puts those sums in that loop and reads only the [N, H, W] partials again
    (resnet20's backward graph 1.1 ms faster; contiguous, the same time as per channel). The layout
    cannot be tested here: Dynamo refuses a gradient hook that reads strides, and while it traces
    a tensor has eager's layout, not the one Inductor picks later.
    """
    if squared_norm is not None and g.device.type == "cpu" and g.dim() < 4:
        return squared_norm(g)
    g = g if g.dtype == torch.float32 else g.float()
    if into_producer and g.dim() == 4:
        return _sum(g.square().sum(1))
    return _sum(g.square())


def _squared_norm(t: Tensor) -> Tensor:
    """||t||^2 as a float32 scalar: an opaque call in a compiled graph, which Inductor cannot fuse."""
    return norm32(t).square()


# gradscope's opaque ops are defined through torch.library with a CPU kernel only (where they are
# used): a call from a compiled graph costs about 4 us, against 14 us for torch.library.custom_op,
# whose Python wrapper handles autograd they never need (the inputs are detached). They take any
# layout (``flexible_layout``: no copy of a channels-last tensor to call them).
OPAQUE_OPS = hasattr(torch.library, "register_fake") and hasattr(torch.Tag, "flexible_layout")  # torch >= 2.5
_LIBRARY = torch.library.Library("gradscope", "DEF") if OPAQUE_OPS else None


def opaque_op(name: str, schema: str, kernel: Any, fake: Any, dispatch: str = "CPU") -> Any:
    """Define ``gradscope::name`` (its kernel for ``dispatch``, fake for tracing); None before torch 2.5.
    An op with no output (``-> ()``) is registered as a side effect, which keeps it out of
    dead-code elimination; None where this torch cannot (the caller then does without it)."""
    if _LIBRARY is None:
        return None
    keep = getattr(torch.fx.node, "has_side_effect", None)
    if schema.endswith("-> ()") and keep is None:
        return None
    _LIBRARY.define(name + schema, tags=(torch.Tag.flexible_layout,))
    _LIBRARY.impl(name, kernel, dispatch)
    torch.library.register_fake(f"gradscope::{name}", fake, lib=_LIBRARY)
    op = getattr(torch.ops.gradscope, name).default
    if schema.endswith("-> ()"):
        keep(op)
    return op


squared_norm = opaque_op("squared_norm", "(Tensor t) -> Tensor", _squared_norm,
                         lambda t: t.new_empty((), dtype=torch.float32))
