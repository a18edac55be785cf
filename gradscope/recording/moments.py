"""Device-side statistics of one tensor: activation moments and squared norms (the hot path's math).

Like torchmetrics' ``update()``: these only launch small device kernels whose results go into
the statistics buffer as raw, mergeable accumulators (``store.schema``); the stored columns are
computed later, on the host.

Activation moments are (mean, variance) per call, computed by two-pass or Welford kernels and
merged across calls with Chan's parallel update (``schema.merge_partial``), so the variance
stays accurate when a tensor's mean is large against its spread (a float32 sum-of-squares
formula loses every digit there). Element counts never live on the device: the hook knows
``numel()`` as a Python int, so merge weights are host scalars and need no sync. Gradient norms
are kept as sums of squares, so calls (and the batched kernels of ``recording.kernels``, which
add atomically) combine by addition; the host takes the square root. A float32 square overflows
above a norm of about 1.8e19, which then reads as inf: a gradient that large has exploded
either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from gradscope.store.schema import ACT_MEAN, ACTIVATION, SATURATION_MARGIN, merge_partial

#: Elements averaged for the shift c of the one-pass variance (here and in ``recording.kernels``).
SHIFT_SAMPLES = 64


class Scratch:
    """A reusable float32 work vector for the CPU formulas that need a difference (y - c, y - x).

    A fresh temporary per call costs more than the arithmetic: its pages are new to the process
    each time, because the model's next activation takes over the memory just freed. One vector
    reused within a forward stays mapped and in cache. The recorder releases it when the forward
    ends, so it adds nothing to the backward's peak memory.
    """

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf: Tensor | None = None

    def take(self, n: int, like: Tensor) -> Tensor:
        """``n`` float32 elements on ``like``'s device, contents undefined."""
        buf = self._buf
        if buf is None or buf.numel() < n or buf.device != like.device:
            buf = self._buf = torch.empty(n, dtype=torch.float32, device=like.device)
        return buf[:n]

    def release(self) -> None:
        self._buf = None


def activation_moments(y: Tensor, bounds: tuple[float, float] | None, count_zeros: bool,
                       scratch: Scratch | None = None) -> list[Tensor]:
    """Float32 scalars: mean, population variance, max |y|, then #nonzero if ``count_zeros``, then
    #saturated if ``bounds``, in buffer column order (#nonzero is a placeholder when only
    saturation is asked for).

    Runs under no_grad inside a forward hook; results stay on ``y``'s device. The kernels are
    chosen per device: on CPU, where bytes cost more than calls, large tensors take the shifted
    one-pass formula (``_shifted_moments``) and middling ones ``torch.var`` plus a mean (both far
    faster per element than the Welford ``var_mean`` there); on CUDA, where launches cost more
    than bytes, and for tiny CPU tensors, ``var_mean`` and one infinity-norm keep it to two ops.
    """
    yf = y if y.dtype == torch.float32 else y.float()
    if y.device.type == "cuda" or y.numel() < _FEW_ELEMENTS:  # launch- or call-bound: fewest ops
        var, mean = torch.var_mean(yf, correction=0)
        if y.dtype in _NARROW:  # float32 output from half types without a converted copy
            absmax = torch.linalg.vector_norm(y, float("inf"), dtype=torch.float32)
        else:  # float64 would be narrowed, which dtype= refuses
            absmax = torch.linalg.vector_norm(yf, float("inf"))
    else:
        if yf.numel() >= _SHIFTED_MIN and yf.is_contiguous():
            mean, var = _shifted_moments(yf.view(-1), scratch)
        else:
            mean, var = yf.mean(), torch.var(yf, correction=0)
        lo, hi = torch.aminmax(y)
        absmax = torch.maximum(lo.abs(), hi.abs()).float()
    parts = [mean, var, absmax]
    if count_zeros or bounds is not None:
        parts.append(torch.count_nonzero(y).float() if count_zeros else mean)
    if bounds is not None:
        parts.append(saturated(y, bounds))
    return parts


def saturated(y: Tensor, bounds: tuple[float, float]) -> Tensor:
    """Float32 count of the elements of ``y`` within SATURATION_MARGIN of the range from a bound."""
    middle, half = (bounds[0] + bounds[1]) / 2, (bounds[1] - bounds[0]) / 2
    # |y - middle| >= (1 - 2 * margin) * half  <=>  within margin * range of a bound
    return ((y - middle).abs() >= (1 - 2 * SATURATION_MARGIN) * half).sum().float()


# Below this many elements the fixed cost of the shifted formula's extra ops outweighs its speed.
_SHIFTED_MIN = 16_384
# Below this many, the cost is per call, not per element: two ops (as on CUDA) instead of six.
_FEW_ELEMENTS = 2_048


def shift_of(flat: Tensor) -> Tensor:
    """The shift c of the one-pass variance: the mean of SHIFT_SAMPLES evenly spaced elements,
    near the true mean whatever its size, so y - c is centred and nothing large cancels."""
    n = flat.numel()
    return flat[:: max(n // SHIFT_SAMPLES, 1)][:SHIFT_SAMPLES].mean()


def shifted_variance(m1: Tensor, m2: Tensor) -> Tensor:
    """Population variance E[d^2] - E[d]^2 from the shifted moments m1 = E[d], m2 = E[d^2]."""
    return torch.addcmul(m2, m1, m1, value=-1).clamp_min_(0)


def _shifted_moments(flat: Tensor, scratch: Scratch | None = None) -> tuple[Tensor, Tensor]:
    """Mean and population variance of a contiguous float32 vector in three fast passes.

    ``torch.var`` on the CPU is a scalar two-pass loop, 2-4x slower than a subtraction, a sum
    and a BLAS dot together; the one-pass formula is accurate on d = y - c (``shift_of``).
    """
    n = flat.numel()
    c = shift_of(flat)
    d = flat - c if scratch is None else torch.sub(flat, c, out=scratch.take(n, flat))
    m = d.sum() / n
    return m + c, shifted_variance(m, torch.dot(d, d) / n)


def merge_activation_(row: Tensor, new: Tensor, n_old: int, n_new: int) -> None:
    """Merge one call's moments ``new`` (as from ``activation_moments``) into ``row`` in place,
    by the schema's rules for the activation columns (count-weighted mean, Chan's variance,
    max, sums)."""
    k = new.shape[0]
    merged = merge_partial(ACTIVATION[:k], row, new, n_old, n_new)
    row[ACT_MEAN:k].copy_(torch.stack(merged))


_NARROW = (torch.float16, torch.bfloat16, torch.float32)


def _dot_ready(t: Tensor) -> bool:
    """Whether ||t||^2 is best taken as a BLAS dot: about twice as fast as vector_norm's reduction
    on the CPU, for large contiguous float32 tensors."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() >= _SHIFTED_MIN and t.is_contiguous()


def norm32(t: Tensor, out: Tensor | None = None) -> Tensor:
    """L2 norm as a float32 scalar, accumulated in float32 (or float64 for float64 input);
    written into ``out`` (a float32 scalar, e.g. a buffer element) when given."""
    if _dot_ready(t):
        v = t.view(-1)
        square = torch.dot(v, v)
        return square.sqrt_() if out is None else torch.sqrt(square, out=out)
    if t.dtype in _NARROW:
        if out is None:
            return torch.linalg.vector_norm(t, dtype=torch.float32)
        return torch.linalg.vector_norm(t, dtype=torch.float32, out=out)
    norm = torch.linalg.vector_norm(t).float()
    return norm if out is None else out.copy_(norm)


def accumulate_square(dst: Tensor, t: Tensor, first: bool) -> None:
    """Add ||t||^2 to the float32 scalar ``dst``; on the first call of a step, write it there."""
    if t.requires_grad:  # a gradient of a create_graph backward; out= would refuse it
        t = t.detach()
    if _dot_ready(t):
        v = t.view(-1)
        if first:
            torch.dot(v, v, out=dst)
        else:
            dst.add_(torch.dot(v, v))
    elif first:
        norm32(t, out=dst).square_()
    else:
        norm = norm32(t)
        dst.addcmul_(norm, norm)


def squared_norms(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """[len(tensors)] float32 squared L2 norms from batched ``torch._foreach_norm`` calls.

    One call covers every tensor (it groups by device and dtype internally); float32
    accumulation is asked for only where it widens, since it cannot narrow float64.
    """
    if not tensors:
        return torch.zeros(0, device=device)
    tensors = list(tensors)
    wide = {i for i, t in enumerate(tensors) if t.dtype not in _NARROW}
    if not wide:
        norms = list(torch._foreach_norm(tensors, 2, dtype=torch.float32))
    else:  # float64 (rare) gets a call of its own
        norms = [torch.empty(0)] * len(tensors)
        narrow = [i for i in range(len(tensors)) if i not in wide]
        for idx, kwargs in ((narrow, {"dtype": torch.float32}), (sorted(wide), {})):
            if idx:
                for i, r in zip(idx, torch._foreach_norm([tensors[i] for i in idx], 2, **kwargs)):
                    norms[i] = r.float()
    if any(t.device != device for t in norms):
        norms = [t.to(device, non_blocking=True) for t in norms]
    return torch.stack(norms).square()
