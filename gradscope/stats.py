"""Device-side accumulators and their host-side finalisation.

Like torchmetrics' ``update()``/``compute()``: the hot path only launches small device kernels
that write raw, mergeable moments into a preallocated buffer; turning moments into the columns of
DESIGN.md Metrics happens later, on the host, in float64, off the training thread.

Activation moments are (mean, M2) per call, merged across calls with Chan's parallel update, so
the variance stays accurate when a tensor's mean is large against its spread (a float32
sum-of-squares formula loses every digit there). Element counts never live on the device: the
hook knows ``numel()`` as a Python int, so merge weights are host scalars and need no sync.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

# Columns of the per-layer device buffer [slots, phases, layers, N_LAYER_STATS].
ACT_MEAN, ACT_M2, ACT_ABSMAX, ACT_ZEROS, ACT_SAT = range(5)
GRAD_OUT_SS = 5  # sum of squares of dL/dy over all calls
PARAM_SS = 6  # sum over own parameters of ||p||^2
GRAD_SS = 7  # sum over own parameters of ||p.grad||^2
N_LAYER_STATS = 8
N_ACT_STATS = 5

# Columns of the per-block device buffer [slots, blocks, N_BLOCK_STATS]; all are sums over calls.
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


def activation_moments(y: Tensor, bounds: tuple[float, float] | None) -> Tensor:
    """[N_ACT_STATS] float32 moments of one output: mean, M2, max |y|, #zeros, #saturated.

    Runs under no_grad inside a forward hook; every result stays on ``y``'s device.
    """
    n = y.numel()
    var, mean = torch.var_mean(y.float(), correction=0)  # float() is a no-op for float32
    lo, hi = torch.aminmax(y)
    absmax = torch.maximum(lo.abs(), hi.abs()).float()
    zeros = n - torch.count_nonzero(y)
    if bounds is None:
        saturated = torch.zeros((), dtype=torch.float32, device=y.device)
    else:
        middle, half = (bounds[0] + bounds[1]) / 2, (bounds[1] - bounds[0]) / 2
        # |y - middle| >= (1 - 2 * margin) * half  <=>  within margin * range of a bound
        saturated = ((y - middle).abs() >= (1 - 2 * SATURATION_MARGIN) * half).sum()
    return torch.stack([mean, var * n, absmax, zeros.float(), saturated.float()])


def merge_activation_(row: Tensor, new: Tensor, n_old: int, n_new: int) -> None:
    """Merge one call's moments into the accumulated ``row`` in place (Chan et al.)."""
    n = n_old + n_new
    delta = new[ACT_MEAN] - row[ACT_MEAN]
    row[ACT_M2].add_(new[ACT_M2] + delta.square() * (n_old * n_new / n))
    row[ACT_MEAN].add_(delta * (n_new / n))
    row[ACT_ABSMAX].copy_(torch.maximum(row[ACT_ABSMAX], new[ACT_ABSMAX]))
    row[ACT_ZEROS : ACT_SAT + 1].add_(new[ACT_ZEROS : ACT_SAT + 1])


_NARROW = (torch.float16, torch.bfloat16, torch.float32)


def norm32(t: Tensor) -> Tensor:
    """L2 norm as a float32 scalar, accumulated in float32 (or float64 for float64 input)."""
    if t.dtype in _NARROW:
        return torch.linalg.vector_norm(t, dtype=torch.float32)
    return torch.linalg.vector_norm(t).float()


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
                 "block_tokens")


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
                    bounded: np.ndarray) -> dict[str, np.ndarray]:
    """DESIGN.md Metrics per-layer columns from raw moments, one entry per non-empty row.

    ``buf`` is the host copy [slots, phases, layers, N_LAYER_STATS], ``steps`` the per-step copy
    [slots, N_STEP_STATS]; ``bounded`` marks rows whose module is a bounded activation
    (saturation is NaN elsewhere). Returns flat arrays plus the ``slot``, ``phase`` and ``row``
    of every emitted row.
    """
    b = buf.astype(np.float64)
    s, p, n = counts.act_n.shape
    act_n = counts.act_n.astype(np.float64)
    has_act = counts.act_n > 0
    mean = np.where(has_act, b[..., ACT_MEAN], np.nan)
    var = _div(b[..., ACT_M2], act_n)

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

    cols: dict[str, np.ndarray] = {
        "act_mean": mean,
        "act_std": np.sqrt(np.maximum(var, 0)),
        "act_rms": np.sqrt(np.maximum(np.square(mean) + var, 0)),
        "act_absmax": np.where(has_act, b[..., ACT_ABSMAX], np.nan),
        "act_zero_frac": _div(b[..., ACT_ZEROS], act_n),
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
        "branch_ratio": where(counts.block_branch * counts.block_samples,
                              np.sqrt(_div(b[..., B_BRANCH_SS], b[..., B_INPUT_SS]))),
        "token_cos": _div(b[..., B_TOKEN_COS_SUM], counts.block_tokens.astype(np.float64)),
        "grad_in_norm": grad_in,
        "grad_out_norm": grad_out,
    }
    slot, row = np.nonzero(counts.block_calls > 0)
    out = {name: col[slot, row] for name, col in cols.items()}
    out.update(slot=slot, row=row)
    return out
