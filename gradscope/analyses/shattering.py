"""Shattered gradients (Balduzzi et al. 2017): how alike the input gradient is at nearby inputs.

Along a line of inputs x_t = a + t (b - a), a smooth model's dL/dx changes little from one point
to the next; in a deep plain network it decorrelates like white noise, and skip connections keep
it correlated. Two numbers say which: the lag-1 autocorrelation of dL/dx along the line (about 1
for smooth, about 0 for white noise) and the slope of its power spectrum on log-log axes (0 for
white noise, -2 for brown noise, the integral of white noise).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from gradscope.analyses._model_state import untouched

POINTS = 256


def shattering(model: nn.Module, start: Tensor, end: Tensor, *, points: int = POINTS, train: bool = True,
               at: str | None = None, projection_seed: int = 0, step: int = 0) -> pd.DataFrame:
    """The shattering measures of ``model`` along the line from ``start`` to ``end`` (one row).

    ``start`` and ``end`` are single inputs (no batch dimension). The ``points`` inputs go
    through the model as one batch, in train mode by default, as in the paper: BatchNorm
    normalises over the line (at initialisation its running statistics are no normalisation at
    all); dropout stays off (it is noise, not the model's function). ``at`` names a module whose
    output space holds the line instead, between its outputs for ``start`` and ``end``: for token
    inputs, where there are no inputs between two, the token embedding (``"transformer.wte"``).
    A model with several outputs per input is read through a fixed random unit vector
    (``projection_seed``), the same at every point. The model is left as it was (see
    ``_model_state``); ``step`` is the checkpoint the row is stored under.
    """
    if not isinstance(start, Tensor) or not isinstance(end, Tensor):
        raise TypeError("shattering: start and end are tensors shaped like one input (no batch dimension)")
    if start.shape != end.shape:
        raise ValueError(f"shattering: start and end differ in shape: {tuple(start.shape)} and {tuple(end.shape)}")
    if at is None and not (start.is_floating_point() and end.is_floating_point()):
        raise ValueError("shattering: the inputs must be floating point (a line between token ids has no "
                         "points in between); pass at= an embedding module to lay the line in its output space")
    if points < 8:
        raise ValueError(f"shattering: points must be at least 8, got {points}")
    modules = dict(model.named_modules())
    if at is not None and at not in modules:
        raise ValueError(f"shattering: {type(model).__name__} has no module {at!r}")
    device = next((p.device for p in model.parameters()), start.device)
    a, b = start.detach().to(device), end.detach().to(device)
    with untouched(model, train=train):
        if at is None:
            x = _line(a, b, points).requires_grad_(True)
            out = model(x)
        else:
            x, out = _line_inside(model, modules[at], a, b, points)
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


def _line(a: Tensor, b: Tensor, points: int) -> Tensor:
    """``points`` evenly spaced points from ``a`` to ``b`` (one input each), as a batch."""
    t = torch.linspace(0, 1, points, device=a.device).reshape(-1, *([1] * a.dim()))
    return a + t * (b - a)


def _line_inside(model: nn.Module, module: nn.Module, a: Tensor, b: Tensor, points: int) -> tuple[Tensor, Any]:
    """The model run on ``a`` repeated, with ``module``'s output replaced by the line between its
    outputs for ``a`` and ``b``; returns the line (requiring grad) and the model's output."""
    ends = []
    catch = module.register_forward_hook(lambda m, args, out: ends.append(out.detach()))
    try:
        with torch.no_grad():
            model(a.unsqueeze(0))
            model(b.unsqueeze(0))
    finally:
        catch.remove()
    if len(ends) != 2 or not all(isinstance(e, Tensor) and e.is_floating_point() for e in ends):
        raise ValueError("shattering: at= must name a module that runs once per forward and returns a "
                         "floating-point tensor")
    line = _line(ends[0][0], ends[1][0], points).requires_grad_(True)  # the batch of one dropped
    put = module.register_forward_hook(lambda m, args, out: line.clone())  # later ops may work in place
    try:
        out = model(a.unsqueeze(0).expand(points, *a.shape))
    finally:
        put.remove()
    return line, out


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
