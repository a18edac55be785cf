"""One pure function per figure: tidy DataFrame in, matplotlib Figure out.

Frames are those of ``reports.data`` (a ``run`` column labels each run). Functions use the
object-oriented matplotlib API (``Figure``, no pyplot state) so they are safe to call anywhere
and easy to test on small frames. Runs of different depth line up on ``rel_depth``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

MAX_HEATMAP_COLUMNS = 200
PANEL = (4.6, 3.2)  # inches per panel


def _mathtext_safe(text: str) -> str:
    """Matplotlib reads $...$ as maths markup; names are plain text."""
    return str(text).replace("$", r"\$")


def _runs(frame: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The frame with plot-safe run labels, and hue settings that give each run one colour in
    every panel, whether or not the panel has data for all runs."""
    if "run" not in frame or frame.empty:
        return frame, {"hue": "run"}
    frame = frame.assign(run=frame["run"].map(_mathtext_safe))
    order = list(dict.fromkeys(frame["run"]))
    palette = dict(zip(order, sns.color_palette(n_colors=len(order))))
    return frame, {"hue": "run", "hue_order": order, "palette": palette}


def _marker(frame: pd.DataFrame, few: int = 20) -> str | None:
    """Markers where runs have few points, so a run of one recorded step still shows."""
    return "o" if frame["step"].nunique() <= few else None


def _figure(panels: int, rows: int = 1) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(PANEL[0] * panels, PANEL[1] * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, panels, squeeze=False)).ravel()
    return fig, axes


def _positive(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows whose value can go on a log axis."""
    values = pd.to_numeric(frame[column], errors="coerce").astype(float)
    return frame[np.isfinite(values) & (values > 0)]


def _empty(ax, text: str = "no data") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_outside(fig: Figure, axes) -> None:
    handles, labels = [], []
    for ax in axes:
        legend = ax.get_legend()
        if legend is not None:
            h, lab = ax.get_legend_handles_labels()
            for hh, ll in zip(h, lab):
                if ll not in labels:
                    handles.append(hh)
                    labels.append(ll)
            legend.remove()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)


def training_curves(scalars: pd.DataFrame) -> Figure:
    """Training loss (log scale) and accuracy per step, one line per run; held-out accuracy dashed."""
    fig, (ax_loss, ax_acc) = _figure(2)
    scalars, hue = _runs(scalars)
    loss = _positive(scalars.dropna(subset=["loss"]), "loss")
    if len(loss):
        sns.lineplot(data=loss, x="step", y="loss", ax=ax_loss, marker=_marker(loss), **hue)
        ax_loss.set_yscale("log")
    else:
        _empty(ax_loss)
    ax_loss.set_title("training loss")
    acc = scalars.dropna(subset=["accuracy"])
    if len(acc):
        sns.lineplot(data=acc, x="step", y="accuracy", ax=ax_acc, alpha=0.6, marker=_marker(acc), **hue)
    held = scalars.dropna(subset=["eval_accuracy"])
    if len(held):
        sns.lineplot(data=held, x="step", y="eval_accuracy", ax=ax_acc, linestyle="--", marker="o",
                     legend=False, **hue)
    if not len(acc) and not len(held):
        _empty(ax_acc)
    ax_acc.set_title("accuracy (training solid, held-out dashed)")
    ax_acc.set_ylabel("accuracy")
    _legend_outside(fig, [ax_loss, ax_acc])
    return fig


def _first_middle_last(steps: pd.Series) -> list[int]:
    s = np.sort(steps.unique())
    return [int(s[0]), int(s[len(s) // 2]), int(s[-1])] if len(s) else []


def gradient_flow(layers: pd.DataFrame, column: str = "grad_out_rms") -> Figure:
    """``column`` against relative depth (log scale) at each run's first, middle and last recorded step."""
    fig, axes = _figure(3)
    layers, hue = _runs(layers)
    picks = {run: _first_middle_last(frame.step) for run, frame in layers.groupby("run", sort=False)}
    for i, (ax, when) in enumerate(zip(axes, ("first", "middle", "last"))):
        rows = [frame[frame.step == picks[run][i]] for run, frame in layers.groupby("run", sort=False)
                if picks[run]]
        data = _positive(pd.concat(rows), column) if rows else pd.DataFrame()
        if len(data):
            sns.lineplot(data=data.sort_values("rel_depth"), x="rel_depth", y=column, ax=ax, marker=".", **hue)
            ax.set_yscale("log")
        else:
            _empty(ax)
        ax.set_title(f"{when} recorded step")
        ax.set_xlabel("relative depth (input 0, output 1)")
    _legend_outside(fig, axes)
    return fig


def downsample_steps(steps: np.ndarray, limit: int = MAX_HEATMAP_COLUMNS) -> np.ndarray:
    """At most ``limit`` evenly spaced steps, first and last kept."""
    steps = np.sort(np.unique(steps))
    if len(steps) <= limit:
        return steps
    return steps[np.unique(np.linspace(0, len(steps) - 1, limit).round().astype(int))]


def layer_step_heatmap(layers: pd.DataFrame, column: str = "grad_out_rms") -> Figure:
    """One run's ``column`` as a layers x steps image (log colour scale, steps downsampled)."""
    keep = downsample_steps(layers.step.to_numpy())
    data = layers[layers.step.isin(keep)]
    grid = data.pivot_table(index=["depth", "layer"], columns="step", values=column, aggfunc="first")
    grid = grid.sort_index(level=0)
    height = min(10.0, max(2.5, 0.12 * len(grid) + 1.2))
    fig = Figure(figsize=(9.5, height), layout="constrained")
    ax = fig.subplots()
    values = grid.to_numpy(dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        _empty(ax)
        return fig
    masked = np.where(np.isfinite(values) & (values > 0), values, np.nan)
    sns.heatmap(pd.DataFrame(masked, index=[_mathtext_safe(name) for _, name in grid.index], columns=grid.columns),
                ax=ax,
                norm=LogNorm(vmin=positive.min(), vmax=positive.max()), cmap="viridis",
                cbar_kws={"label": column}, xticklabels=max(1, len(grid.columns) // 10),
                yticklabels=max(1, len(grid) // 40))
    ax.set_xlabel("step")
    ax.set_ylabel("layer (network order)")
    ax.tick_params(labelsize="x-small")
    return fig


def activation_std_by_depth(layers: pd.DataFrame) -> Figure:
    """Std of layer responses at each run's last recorded step, in network order and sorted.

    As in He et al. 2015 Fig. 7, the responses of normalisation layers (the 3x3 convs' outputs
    after BN, before the ReLU or addition) are used when a run has them, else every layer.
    """
    fig, (ax_order, ax_sorted) = _figure(2)
    layers, hue = _runs(layers)
    rows = []
    for run, frame in layers.groupby("run", sort=False):
        last = frame[frame.step == frame.step.max()].sort_values("depth")
        norms = last[last.type.astype(str).str.contains("Norm")]
        picked = norms if len(norms) else last
        picked = picked[np.isfinite(picked.act_std)]
        n = len(picked)
        rows.append(pd.DataFrame({"run": run, "index": np.arange(n) / max(n - 1, 1), "std": picked.act_std.to_numpy(),
                                  "rank": np.arange(n) / max(n - 1, 1),
                                  "sorted": np.sort(picked.act_std.to_numpy())[::-1]}))
    data = pd.concat(rows) if rows else pd.DataFrame()
    if len(data):
        sns.lineplot(data=data, x="index", y="std", ax=ax_order, **hue)
        sns.lineplot(data=data, x="rank", y="sorted", ax=ax_sorted, **hue)
    else:
        _empty(ax_order)
        _empty(ax_sorted)
    ax_order.set(title="in network order", xlabel="relative layer index", ylabel="std of response")
    ax_sorted.set(title="sorted by magnitude", xlabel="relative rank", ylabel="std of response")
    _legend_outside(fig, [ax_order, ax_sorted])
    return fig


IDENTITY_COLUMNS = (("id_rel_residual", "||y - x|| / ||x||", False), ("id_grad_ratio", "||dL/dx|| / ||dL/dy||", True),
                    ("branch_ratio", "||F(x)|| / ||x||", False))


def identity_by_depth(blocks: pd.DataFrame) -> Figure:
    """Identity closeness of every block against relative block depth, at each run's last step."""
    fig, axes = _figure(3)
    blocks, hue = _runs(blocks)
    last = (pd.concat([f[f.step == f.step.max()] for _, f in blocks.groupby("run", sort=False)])
            if len(blocks) else blocks)
    for ax, (column, label, log) in zip(axes, IDENTITY_COLUMNS):
        data = last.dropna(subset=[column]) if len(last) else last
        data = data[np.isfinite(data[column])] if len(data) else data
        if len(data):
            sns.lineplot(data=data.sort_values("rel_depth"), x="rel_depth", y=column, ax=ax, marker="o", **hue)
            if log:
                ax.set_yscale("log")
                ax.axhline(1.0, color="0.6", linewidth=0.8, linestyle=":")
        else:
            _empty(ax, "not measured")
        ax.set(title=label, xlabel="relative block depth", ylabel=column)
    _legend_outside(fig, axes)
    return fig


def identity_over_training(blocks: pd.DataFrame) -> Figure:
    """Mean over blocks of identity closeness per step, one line per run; token_cos when measured."""
    columns = [("id_rel_residual", "mean ||y - x|| / ||x||"), ("id_cos", "mean cos(x, y)")]
    if len(blocks) and blocks.token_cos.notna().any():
        columns.append(("token_cos", "mean token cosine (1 = collapse)"))
    fig, axes = _figure(len(columns))
    blocks, hue = _runs(blocks)
    for ax, (column, title) in zip(axes, columns):
        data = blocks.dropna(subset=[column]) if len(blocks) else blocks
        if len(data):
            mean = data.groupby(["run", "step"], sort=False)[column].mean().reset_index()
            sns.lineplot(data=mean, x="step", y=column, ax=ax, marker=_marker(mean), **hue)
        else:
            _empty(ax, "not measured")
        ax.set_title(title)
    _legend_outside(fig, axes)
    return fig


def attribution_by_depth(attribution: pd.DataFrame, column: str, title: str, log: bool) -> Figure:
    """``column`` of the attribution table against relative block depth, at each run's first and
    last checkpoint (two panels)."""
    fig, axes = _figure(2)
    frame, hue = _runs(attribution)
    data = frame.dropna(subset=[column]) if len(frame) else frame
    data = data[np.isfinite(data[column].astype(float))] if len(data) else data
    for ax, (which, pick) in zip(axes, (("first", "min"), ("last", "max"))):
        rows = pd.concat([f[f.step == getattr(f.step, pick)()] for _, f in data.groupby("run", sort=False)]) \
            if len(data) else data
        if log and len(rows):
            rows = _positive(rows, column)
        if len(rows):
            sns.lineplot(data=rows.sort_values("rel_depth"), x="rel_depth", y=column, ax=ax, marker="o", **hue)
            if log:
                ax.set_yscale("log")
            steps = sorted(set(rows.step.astype(int)))
            ax.set_title(f"{title}, {which} checkpoint (step {', '.join(map(str, steps))})")
        else:
            _empty(ax, "not measured")
            ax.set_title(f"{title}, {which} checkpoint")
        ax.set(xlabel="relative block depth", ylabel=column)
    _legend_outside(fig, axes)
    return fig


def coord_check(table: pd.DataFrame, steps: int = 4) -> Figure:
    """muP's coordinate check (Yang et al. 2021, Fig. 5): each layer's activation RMS against
    width, one panel per step (up to ``steps``, from initialisation), colour by depth."""
    shown = sorted(table.step.unique())[:steps]
    fig, axes = _figure(max(len(shown), 1))
    finite = table[np.isfinite(table.act_rms.astype(float)) & (table.act_rms > 0)]
    for ax, step in zip(axes, shown):
        rows = finite[finite.step == step]
        if len(rows):
            sns.lineplot(data=rows, x="width", y="act_rms", hue="rel_depth", units="layer", estimator=None,
                         palette="viridis", hue_norm=(0, 1), marker="o", legend=False, ax=ax)
            ax.set(xscale="log", yscale="log")
        else:
            _empty(ax)
        ax.set(title=f"step {step}", xlabel="width", ylabel="activation RMS")
    if not shown:
        _empty(axes[0])
    fig.suptitle("one line per layer; colour: depth (dark = input side, yellow = output)", fontsize="small")
    return fig


def shattering(table: pd.DataFrame) -> Figure:
    """Lag-1 autocorrelation and spectrum slope of dL/dx along the line, per run and checkpoint."""
    fig, axes = _figure(2)
    frame, hue = _runs(table)
    for ax, (column, title) in zip(axes, (("autocorr_lag1", "lag-1 autocorrelation of dL/dx (1 smooth, 0 white)"),
                                          ("spectrum_slope", "power spectrum slope (0 white, -2 brown)"))):
        data = frame[np.isfinite(frame[column].astype(float))] if len(frame) else frame
        if len(data):
            sns.lineplot(data=data, x="step", y=column, ax=ax, marker="o", **hue)
        else:
            _empty(ax, "not measured")
        ax.set(title=title, xlabel="checkpoint step", ylabel=column)
    axes[0].axhline(0.0, color="0.6", linewidth=0.8, linestyle=":")
    _legend_outside(fig, axes)
    return fig


def lesion(table: pd.DataFrame) -> Figure:
    """Loss increase with each block replaced by the identity, in execution order: a symmetric log
    scale, since removing a residual block can lower the loss a little (an increase below 0)."""
    fig, axes = _figure(1)
    frame, hue = _runs(table)
    data = frame[frame.step == frame.groupby("run").step.transform("max")] if len(frame) else frame
    data = data[np.isfinite(data.loss_increase.astype(float))] if len(data) else data
    ax = axes[0]
    if len(data):
        data = data.assign(rel_order=data.order / data.groupby("run").order.transform("max").clip(lower=1))
        sns.lineplot(data=data, x="rel_order", y="loss_increase", ax=ax, marker="o", **hue)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.axhline(0.0, color="0.6", linewidth=0.8, linestyle=":")
    else:
        _empty(ax, "no block could be replaced")
    ax.set(title="loss increase without the block", xlabel="relative block position", ylabel="loss - base loss")
    _legend_outside(fig, axes)
    return fig


def noise_scale(table: pd.DataFrame) -> Figure:
    """B_simple over training, per run, with each run's batch size for scale (log axis)."""
    fig, axes = _figure(1)
    frame, hue = _runs(table)
    data = _positive(frame, "b_simple") if len(frame) else frame
    ax = axes[0]
    if len(data):
        sns.lineplot(data=data, x="step", y="b_simple", ax=ax, marker=_marker(data), **hue)
        for run, rows in data.groupby("run", sort=False):
            ax.axhline(float(rows.b_big.iloc[-1]), color=hue["palette"][run], linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
    else:
        _empty(ax, "no positive estimate yet")
    ax.set(title="B_simple (dotted: batch size)", xlabel="step", ylabel="B_simple")
    _legend_outside(fig, axes)
    return fig

