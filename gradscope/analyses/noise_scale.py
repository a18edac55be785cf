"""The gradient noise scale (McCandlish et al. 2018): the batch size past which a bigger batch buys little.

B_simple = tr(Sigma) / |G|^2, where G is the true gradient and Sigma the per-example covariance.
From a small and a big batch's squared gradient norms (``E|G_B|^2 = |G|^2 + tr(Sigma) / B``),
appendix A's unbiased estimators are

    |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Each is noisy, so both are smoothed over steps (an exponential moving average, bias-corrected as
Adam's) before their ratio is taken. The small batches are those ``watch(noise_scale=True)``
recorded (micro-batches, or each rank's share); the big one is the step's gradient.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from gradscope.store import Run, load_run

SMOOTHING = 0.9


def noise_scale(run: Run | str | os.PathLike[str], *, smoothing: float = SMOOTHING,
                batch_small: int | None = None) -> pd.DataFrame:
    """B_simple over training, one row per recorded step with a small and a big batch.

    ``batch_small``: the samples in one micro-batch, where the recorder could not count them (a
    model compiled in place, ``model.compile()``, runs the hook that counts them inside its graph).
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"noise_scale: smoothing must be in [0, 1), got {smoothing}")
    run = run if isinstance(run, Run) else load_run(run)
    s = run.scalars.copy()
    small = s["grad_small_sq"].notna()
    if batch_small is not None:
        if batch_small < 1:
            raise ValueError(f"noise_scale: batch_small must be at least 1, got {batch_small}")
        s["batch_small"], s["batch_big"] = float(batch_small), s["small_batches"] * batch_small
    elif small.any() and not (s.loc[small, "batch_small"] > 0).any():
        raise ValueError(f"run {run.path} holds small-batch gradient norms but not how many samples each had "
                         "(a model compiled in place hides its inputs from the recorder): pass batch_small=N "
                         "(gradscope analyse noise-scale --batch-small N)")
    usable = small & (s["batch_big"] > s["batch_small"])
    if not usable.any():
        raise ValueError(f"run {run.path} holds no small-batch gradient norms: record it with "
                         "watch(noise_scale=True) (gradscope run --noise-scale) and either gradient "
                         "accumulation over 2 or more micro-batches or 2 or more processes")
    s = s[usable]
    b_small, b_big = s["batch_small"].to_numpy(), s["batch_big"].to_numpy()
    pre_clip = s["grad_norm_pre_clip"].to_numpy()
    g_big_sq = np.where(np.isnan(pre_clip), s["grad_global_norm"].to_numpy(), pre_clip) ** 2
    g_small_sq = s["grad_small_sq"].to_numpy()
    g_sq = (b_big * g_big_sq - b_small * g_small_sq) / (b_big - b_small)
    trace = (g_small_sq - g_big_sq) / (1 / b_small - 1 / b_big)
    g_smooth, trace_smooth = _ema(g_sq, smoothing), _ema(trace, smoothing)
    with np.errstate(divide="ignore", invalid="ignore"):
        b_simple = np.where(g_smooth > 0, trace_smooth / g_smooth, np.nan)
    return pd.DataFrame({"step": s["step"].to_numpy(), "b_small": b_small, "b_big": b_big,
                         "g_small_sq": g_small_sq, "g_big_sq": g_big_sq, "g_sq": g_sq, "trace_sigma": trace,
                         "g_sq_smooth": g_smooth, "trace_sigma_smooth": trace_smooth, "b_simple": b_simple})


def _ema(x: np.ndarray, beta: float) -> np.ndarray:
    """Exponential moving average over the finite values, divided by 1 - beta^n (Adam's bias correction)."""
    out = np.empty_like(x)
    avg, n = 0.0, 0
    for i, v in enumerate(x):
        if np.isfinite(v):
            avg, n = beta * avg + (1 - beta) * v, n + 1
        out[i] = avg / (1 - beta ** n) if n else np.nan
    return out
