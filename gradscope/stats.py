"""Device-side accumulators and their host-side finalisation.

Like torchmetrics' ``update()``/``compute()``: the hot path only launches small device kernels
that write raw, mergeable moments into a preallocated buffer; turning moments into the columns of
DESIGN.md Metrics happens later, on the host, in float64, off the training thread.

Activation moments are (mean, variance) per call, computed by two-pass or Welford kernels and
merged across calls with Chan's parallel update, so the variance stays accurate when a tensor's
mean is large against its spread (a float32 sum-of-squares formula loses every digit there).
Element counts never live on the device: the hook knows ``numel()`` as a Python int, so merge
weights are host scalars and need no sync. Gradient norms are kept as sums of squares, so calls
(and the batched kernels of ``gradscope.kernels``, which add atomically) combine by addition; the
host takes the square root. A float32 square overflows above a norm of about 1.8e19, which then
reads as inf: a gradient that large has exploded either way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

# Columns of the per-layer device buffer [slots, phases, layers, N_LAYER_STATS]: the mean and
# population variance of the output over all calls, max |y|, and counts of nonzero and saturated
# elements (only where the module's kind makes them mean something).
ACT_MEAN, ACT_VAR, ACT_ABSMAX, ACT_NONZERO, ACT_SAT = range(5)
GRAD_OUT_SS = 5  # squared L2 norm of dL/dy over all calls
PARAM_SS = 6  # sum over own parameters of ||p||^2
GRAD_SS = 7  # sum over own parameters of ||p.grad||^2
N_LAYER_STATS = 8

# Columns of the per-block device buffer [slots, blocks, N_BLOCK_STATS]: sums over calls and
# samples of ||y - x||^2, ||x||^2 and cos(x, y); squared L2 norms over calls of dL/dx, dL/dy and
# F(x); the sum of per-sample token cosines.
B_DIFF_SS, B_INPUT_SS, B_COS_SUM, B_GRAD_IN_SS, B_GRAD_OUT_SS, B_BRANCH_SS, B_TOKEN_COS_SUM = range(7)
N_BLOCK_STATS = 7

PHASES = ("train", "eval")
TRAIN, EVAL = 0, 1

# Columns of the per-step device buffer [slots, N_STEP_STATS].
LOSS, ACCURACY, GRAD_GLOBAL_SS, LOSS_SCALE, EVAL_LOSS, EVAL_ACCURACY = range(6)
N_STEP_STATS = 6

# Outputs within this fraction of a bounded activation's range from either bound count as saturated.
SATURATION_MARGIN = 0.01


def saturation_range(module: torch.nn.Module) -> tuple[float, float] | None:
    """(low, high) bounds of a bounded activation's output, or None for any other module."""
    if isinstance(module, torch.nn.Sigmoid):
        return (0.0, 1.0)
    if isinstance(module, torch.nn.Tanh):
        return (-1.0, 1.0)
    if isinstance(module, torch.nn.Hardtanh):  # includes ReLU6
        return (float(module.min_val), float(module.max_val))
    return None


#: Modules whose outputs are exactly zero where a unit is off, so the zero fraction means dead units.
ZERO_MEANINGFUL = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Threshold, torch.nn.Hardshrink, torch.nn.Softshrink)


def counts_zeros(module: torch.nn.Module) -> bool:
    """Whether ``act_zero_frac`` is measured for ``module`` (a pre-activation's is noise, and costs a pass)."""
    return isinstance(module, ZERO_MEANINGFUL) or (isinstance(module, torch.nn.Hardtanh) and module.min_val == 0)


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
        middle, half = (bounds[0] + bounds[1]) / 2, (bounds[1] - bounds[0]) / 2
        # |y - middle| >= (1 - 2 * margin) * half  <=>  within margin * range of a bound
        parts.append(((y - middle).abs() >= (1 - 2 * SATURATION_MARGIN) * half).sum().float())
    return parts


# Below this many elements the fixed cost of the shifted formula's extra ops outweighs its speed.
_SHIFTED_MIN = 16_384
# Below this many, the cost is per call, not per element: two ops (as on CUDA) instead of six.
_FEW_ELEMENTS = 2_048
_SHIFT_SAMPLES = 64


def _shifted_moments(flat: Tensor, scratch: Scratch | None = None) -> tuple[Tensor, Tensor]:
    """Mean and population variance of a contiguous float32 vector in three fast passes.

    ``torch.var`` on the CPU is a scalar two-pass loop, 2-4x slower than a subtraction, a sum
    and a BLAS dot together. The one-pass formula E[d^2] - E[d]^2 is accurate when d = y - c is
    centred, so c is the mean of a few evenly spaced elements (near the true mean whatever its
    size); y - c is then exact for values near c, and nothing large cancels.
    """
    n = flat.numel()
    c = flat[:: n // _SHIFT_SAMPLES].mean()
    d = flat - c if scratch is None else torch.sub(flat, c, out=scratch.take(n, flat))
    m = d.sum() / n
    return m + c, torch.addcmul(torch.dot(d, d) / n, m, m, value=-1).clamp_min_(0)


def merge_activation_(row: Tensor, new: Tensor, n_old: int, n_new: int) -> None:
    """Merge one call's moments ``new`` (as from ``activation_moments``) into ``row`` in place.

    Chan et al.'s update on M2 = var * n, written for variances: the merged population variance
    is (var_a n_a + var_b n_b + delta^2 n_a n_b / n) / n.
    """
    n = n_old + n_new
    delta = new[ACT_MEAN] - row[ACT_MEAN]
    merged_var = (row[ACT_VAR] * (n_old / n) + new[ACT_VAR] * (n_new / n)
                  + delta.square() * (n_old * n_new / n / n))
    row[ACT_VAR].copy_(merged_var)
    row[ACT_MEAN].add_(delta * (n_new / n))
    row[ACT_ABSMAX].copy_(torch.maximum(row[ACT_ABSMAX], new[ACT_ABSMAX]))
    k = new.shape[0]
    if k > ACT_NONZERO:
        row[ACT_NONZERO:k].add_(new[ACT_NONZERO:k])


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


_COUNT_FIELDS = ("act_n", "act_calls", "grad_n", "grad_calls", "param_rows", "grad_rows",
                 "grads_scaled", "step_set", "lr", "step_lr",
                 "block_calls", "block_samples", "block_grad_in", "block_grad_out", "block_branch",
                 "block_branch_dropped", "block_tokens")


class HostCounts:
    """What the host knows about each buffer slot without reading the device.

    Kept in numpy on the host so the hot path never syncs; the finaliser uses it to drop empty
    rows, to turn moments into means and norms, and to undo the AMP loss scale.
    """

    def __init__(self, slots: int, layers: int, blocks: int = 0) -> None:
        self.slots, self.layers, self.blocks = slots, layers, blocks
        self.act_n = np.zeros((slots, len(PHASES), layers), np.int64)  # elements seen
        self.act_calls = np.zeros((slots, len(PHASES), layers), np.int64)  # forward calls
        self.grad_n = np.zeros((slots, layers), np.int64)  # dL/dy elements seen
        self.grad_calls = np.zeros((slots, layers), np.int64)
        self.param_rows = np.zeros((slots, layers), bool)  # PARAM_SS written
        self.grad_rows = np.zeros((slots, layers), bool)  # GRAD_SS written (some grad present)
        self.grads_scaled = np.zeros(slots, bool)  # parameter grads still carry the loss scale
        self.step_set = np.zeros((slots, N_STEP_STATS), bool)  # per-step scalar written
        self.lr = np.full((slots, layers), np.nan)  # learning rate of each row's parameters
        self.step_lr = np.full(slots, np.nan)
        # per block: forward calls, samples compared with the identity (same-shape calls only),
        # gradient hooks fired at input and output, branch outputs seen, samples with token_cos
        self.block_calls = np.zeros((slots, blocks), np.int64)
        self.block_samples = np.zeros((slots, blocks), np.int64)
        self.block_grad_in = np.zeros((slots, blocks), np.int64)
        self.block_grad_out = np.zeros((slots, blocks), np.int64)
        self.block_branch = np.zeros((slots, blocks), np.int64)
        self.block_branch_dropped = np.zeros((slots, blocks), bool)  # a held F(x) changed in place
        self.block_tokens = np.zeros((slots, blocks), np.int64)

    def clear(self, slot: int) -> None:
        fresh = HostCounts(1, self.layers, self.blocks)
        for name in _COUNT_FIELDS:
            getattr(self, name)[slot] = getattr(fresh, name)[0]

    def move(self, src: int, dst: int) -> None:
        for name in _COUNT_FIELDS:
            a = getattr(self, name)
            a[dst] = a[src]

    def take(self, n_slots: int) -> "HostCounts":
        """A copy of the first ``n_slots`` slots, handed to the writer thread."""
        out = HostCounts(0, self.layers, self.blocks)
        out.slots = n_slots
        for name in _COUNT_FIELDS:
            setattr(out, name, getattr(self, name)[:n_slots].copy())
        return out


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.where(b > 0, b, 1), np.nan)


def loss_scales(steps: np.ndarray, counts: HostCounts) -> np.ndarray:
    """[slots] AMP loss scale of each slot; 1 where no scaler was in use."""
    return np.where(counts.step_set[:, LOSS_SCALE], steps[:, LOSS_SCALE].astype(np.float64), 1.0)


def finalize_layers(buf: np.ndarray, steps: np.ndarray, counts: HostCounts,
                    bounded: np.ndarray, zero_counted: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """DESIGN.md Metrics per-layer columns from raw moments, one entry per non-empty row.

    ``buf`` is the host copy [slots, phases, layers, N_LAYER_STATS], ``steps`` the per-step copy
    [slots, N_STEP_STATS]; ``bounded`` marks rows whose module is a bounded activation
    (saturation is NaN elsewhere), ``zero_counted`` those whose nonzero elements were counted
    (default: all). Returns flat arrays plus the ``slot``, ``phase`` and ``row``
    of every emitted row.
    """
    b = buf.astype(np.float64)
    s, p, n = counts.act_n.shape
    act_n = counts.act_n.astype(np.float64)
    has_act = counts.act_n > 0
    mean = np.where(has_act, b[..., ACT_MEAN], np.nan)
    var = np.where(has_act, b[..., ACT_VAR], np.nan)

    # Gradients of a scaled loss carry the scale; parameter grads only until the scaler unscales.
    scale = loss_scales(steps, counts)[:, None]
    grad_out_ss = np.where(counts.grad_n > 0, b[:, TRAIN, :, GRAD_OUT_SS], np.nan) / scale**2
    param_scale = np.where(counts.grads_scaled[:, None], scale, 1.0)
    param_ss = np.where(counts.param_rows, b[:, TRAIN, :, PARAM_SS], np.nan)
    grad_ss = np.where(counts.grad_rows, b[:, TRAIN, :, GRAD_SS], np.nan) / param_scale**2

    def train_only(x: np.ndarray) -> np.ndarray:
        out = np.full((s, p, n), np.nan)
        out[:, TRAIN] = x
        return out

    zeros_known = np.ones(n, bool) if zero_counted is None else zero_counted
    cols: dict[str, np.ndarray] = {
        "act_mean": mean,
        "act_std": np.sqrt(np.maximum(var, 0)),
        "act_rms": np.sqrt(np.maximum(np.square(mean) + var, 0)),
        "act_absmax": np.where(has_act, b[..., ACT_ABSMAX], np.nan),
        "act_zero_frac": np.where(zeros_known[None, None, :], _div(act_n - b[..., ACT_NONZERO], act_n), np.nan),
        "act_sat_frac": np.where(bounded[None, None, :], _div(b[..., ACT_SAT], act_n), np.nan),
    }
    grad_norm = np.sqrt(grad_ss)
    param_norm = np.sqrt(param_ss)
    cols["grad_out_norm"] = train_only(np.sqrt(grad_out_ss))
    cols["grad_out_rms"] = train_only(np.sqrt(_div(grad_out_ss, counts.grad_n.astype(np.float64))))
    cols["param_norm"] = train_only(param_norm)
    cols["grad_norm"] = train_only(grad_norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        cols["update_ratio"] = train_only(counts.lr * grad_norm / param_norm)

    keep = has_act.copy()
    keep[:, TRAIN] |= (counts.grad_n > 0) | counts.param_rows
    slot, phase, row = np.nonzero(keep)
    out = {name: col[slot, phase, row] for name, col in cols.items()}
    out.update(slot=slot, phase=phase, row=row)
    return out


def finalize_steps(steps: np.ndarray, counts: HostCounts) -> dict[str, np.ndarray]:
    """Per-step scalar columns for every slot that has any of them."""
    st = steps.astype(np.float64)
    present = counts.step_set.any(axis=1) | ~np.isnan(counts.step_lr)

    def written(col: int, values: np.ndarray) -> np.ndarray:
        return np.where(counts.step_set[:, col], values, np.nan)

    grad_scale = np.where(counts.grads_scaled, loss_scales(steps, counts), 1.0)
    cols = {
        "loss": written(LOSS, st[:, LOSS]),
        "accuracy": written(ACCURACY, st[:, ACCURACY]),
        "lr": counts.step_lr,
        "grad_global_norm": written(GRAD_GLOBAL_SS, np.sqrt(st[:, GRAD_GLOBAL_SS]) / grad_scale),
        "loss_scale": written(LOSS_SCALE, st[:, LOSS_SCALE]),
        "eval_loss": written(EVAL_LOSS, st[:, EVAL_LOSS]),
        "eval_accuracy": written(EVAL_ACCURACY, st[:, EVAL_ACCURACY]),
    }
    slot = np.nonzero(present)[0]
    out = {name: col[slot] for name, col in cols.items()}
    out["slot"] = slot
    return out


def finalize_blocks(buf: np.ndarray, steps: np.ndarray, counts: HostCounts) -> dict[str, np.ndarray]:
    """DESIGN.md Metrics per-block columns from the summed moments, one entry per block called.

    ``buf`` is the host copy [slots, blocks, N_BLOCK_STATS] (columns B_*).
    Identity metrics are NaN for calls that changed shape (no samples compared).
    """
    b = buf.astype(np.float64)
    samples = counts.block_samples.astype(np.float64)
    scale = loss_scales(steps, counts)[:, None]

    def where(n: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.where(n > 0, x, np.nan)

    grad_in = where(counts.block_grad_in, np.sqrt(b[..., B_GRAD_IN_SS]) / scale)
    grad_out = where(counts.block_grad_out, np.sqrt(b[..., B_GRAD_OUT_SS]) / scale)
    cols = {
        "id_rel_residual": np.sqrt(_div(b[..., B_DIFF_SS], np.where(samples > 0, b[..., B_INPUT_SS], 0))),
        "id_cos": _div(b[..., B_COS_SUM], samples),
        "id_grad_ratio": where(counts.block_samples, grad_in / grad_out),
        "branch_ratio": where(counts.block_branch * counts.block_samples * ~counts.block_branch_dropped,
                              np.sqrt(_div(b[..., B_BRANCH_SS], b[..., B_INPUT_SS]))),
        "token_cos": _div(b[..., B_TOKEN_COS_SUM], counts.block_tokens.astype(np.float64)),
        "grad_in_norm": grad_in,
        "grad_out_norm": grad_out,
    }
    slot, row = np.nonzero(counts.block_calls > 0)
    out = {name: col[slot, row] for name, col in cols.items()}
    out.update(slot=slot, row=row)
    return out
