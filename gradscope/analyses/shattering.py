"""Shattered gradients (Balduzzi et al. 2017): how alike the input gradient is at nearby inputs.

Along a line of inputs x_t = a + t (b - a), a smooth model's dL/dx changes little from one point
to the next; in a deep plain network it decorrelates like white noise, and skip connections keep
it correlated. Two numbers say which: the lag-1 autocorrelation of dL/dx along the line (about 1
for smooth, about 0 for white noise) and the slope of its power spectrum on log-log axes (0 for
white noise, -2 for brown noise, the integral of white noise).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from gradscope.analyses._model_state import untouched

POINTS = 256


def shattering(model: nn.Module, start: Tensor, end: Tensor, *, points: int = POINTS, train: bool = True,
               projection_seed: int = 0, step: int = 0) -> pd.DataFrame:
    """The shattering measures of ``model`` along the line from ``start`` to ``end`` (one row).

    ``start`` and ``end`` are single inputs (no batch dimension). The ``points`` inputs go
    through the model as one batch, in train mode by default, as in the paper: BatchNorm
    normalises over the line (at initialisation its running statistics are no normalisation at
    all). A model with several outputs per input is read through a fixed random unit vector
    (``projection_seed``), the same at every point. The model is left as it was (see
    ``_model_state``); ``step`` is the checkpoint the row is stored under.
    """
    if not isinstance(start, Tensor) or not isinstance(end, Tensor):
        raise TypeError("shattering: start and end are tensors shaped like one input (no batch dimension)")
    if start.shape != end.shape:
        raise ValueError(f"shattering: start and end differ in shape: {tuple(start.shape)} and {tuple(end.shape)}")
    if not (start.is_floating_point() and end.is_floating_point()):
        raise ValueError("shattering: the inputs must be floating point (a line between token ids has no "
                         "points in between); run it on a model whose input is continuous")
    if points < 8:
        raise ValueError(f"shattering: points must be at least 8, got {points}")
    device = next((p.device for p in model.parameters()), start.device)
    t = torch.linspace(0, 1, points, device=device).reshape(-1, *([1] * start.dim()))
    a, b = start.detach().to(device), end.detach().to(device)
    with untouched(model, train=train):
        x = (a + t * (b - a)).requires_grad_(True)
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        flat = out.float().reshape(points, -1)
        if flat.shape[1] == 1:
            score = flat.sum()
        else:
            generator = torch.Generator().manual_seed(projection_seed)
            direction = torch.randn(flat.shape[1], generator=generator).to(device)
            score = (flat @ (direction / direction.norm())).sum()
        (grad,) = torch.autograd.grad(score, x)
    g = grad.detach().double().reshape(points, -1).cpu().numpy()  # once per checkpoint, not per step
    return pd.DataFrame([{"step": step, **measures(g), "points": points,
                          "line": f"{_describe(a)} -> {_describe(b)}"}])


def measures(g: np.ndarray) -> dict[str, float]:
    """Lag-1 autocorrelation and spectrum slope of a sequence of gradients ``g[points, dims]``.

    The autocorrelation is that of the centred sequence, summed over dimensions (for one
    dimension, the usual one); the spectrum is the power of the centred sequence's discrete
    Fourier transform, summed over dimensions, fitted by least squares on log-log axes over
    every non-zero frequency.
    """
    d = g - g.mean(axis=0)
    energy = float((d * d).sum())
    autocorr = float((d[:-1] * d[1:]).sum() / energy) if energy > 0 else float("nan")
    power = (np.abs(np.fft.rfft(d, axis=0)) ** 2).sum(axis=1)[1:]
    freq = np.arange(1, len(power) + 1, dtype=np.float64)
    keep = power > 0
    slope = float(np.polyfit(np.log(freq[keep]), np.log(power[keep]), 1)[0]) if keep.sum() >= 2 else float("nan")
    return {"autocorr_lag1": autocorr, "spectrum_slope": slope,
            "grad_norm_mean": float(np.linalg.norm(g, axis=1).mean())}


def _describe(x: Tensor) -> str:
    if x.numel() <= 4:
        return "[" + ", ".join(f"{v:.3g}" for v in x.flatten().tolist()) + "]"
    return f"tensor{tuple(x.shape)} |x|={x.float().norm():.3g}"
