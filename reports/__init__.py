"""HTML comparison reports over recorded runs (installed as ``gradscope.reports``).

``build(runs, out)`` writes one self-contained file: inline CSS, figures as base64 PNG, no
scripts and no network fetches (a Content-Security-Policy forbids them), so it opens from disk
or a CI artifact. Depends on the core, never the other way round, so ``gradscope.watch``
stays light.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from gradscope.reports import figures
from gradscope.reports.data import ReportData, RunLike, collect, non_finite_text
from gradscope.reports.render import Embedded, embed, environment

from gradscope import __version__, diagnose
from gradscope.analysis.coord import coord_table


@dataclass
class Section:
    id: str
    title: str
    figures: list[Embedded] = field(default_factory=list)
    intro: str = ""
    note: str = ""  # shown as a warning: e.g. values the figures had to leave out


def _num(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (bool, int)) or not isinstance(value, float):  # counts, steps, names as they are
        return str(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.3g}"


#: The columns each section's figures plot, by table: NaN and inf there are left out of them.
PLOTTED = {
    "curves": ("scalars", ("loss", "accuracy", "eval_accuracy")),
    "gradient-flow": ("layers", ("grad_out_rms", "grad_norm")),
    "heatmaps": ("layers", ("grad_out_rms",)),
    "activations": ("layers", ("act_std",)),
    "identity": ("blocks", ("id_rel_residual", "id_grad_ratio", "branch_ratio", "id_cos", "token_cos")),
}


def dropped_note(data: ReportData, section: str) -> str:
    """Which measured NaN or inf values a section's figures leave out (a log axis or a line
    cannot show them), by run; empty where there are none."""
    if section not in PLOTTED:
        return ""
    table, columns = PLOTTED[section]
    parts = []
    for run, label in zip(data.runs, data.labels):
        mask = data.non_finite[label][table]
        if table == "layers":  # the figures plot training rows
            mask = mask[(run.layers.phase == "train").to_numpy()]
        text = non_finite_text(run, {table: mask}, table, columns)
        if text:
            parts.append(f"{label}: {text}")
    return ("Non-finite values (NaN or inf) cannot be plotted and are left out of these figures: "
            + "; ".join(parts) + ".") if parts else ""


def gradient_flow_figure(layers: pd.DataFrame) -> Embedded:
    """The report's first look at a run: how the gradient's size changes with depth."""
    return embed(figures.gradient_flow(layers, "grad_out_rms"),
                 "RMS of dL/dy, the gradient flowing back through each layer",
                 "A line falling toward depth 0 means the gradient vanishes on its way to the input; "
                 "rising means it explodes.",
                 "Three log-scale line charts of the RMS output gradient against relative depth "
                 "at the first, middle and last recorded step.")


def sections(data: ReportData) -> list[Section]:
    """Every section of the report, figures rendered."""
    layers, blocks = data.layers, data.blocks
    out = [Section("curves", "Loss and accuracy", [embed(
        figures.training_curves(data.scalars), "",
        "Look for the deeper plain network's training loss staying above the shallower one's (degradation).",
        "Line charts of training loss on a log scale and of training and held-out accuracy against step, "
        "one line per run.")])]
    out.append(Section("gradient-flow", "Gradient flow by depth", [
        gradient_flow_figure(layers),
        embed(figures.gradient_flow(layers, "grad_norm"), "norm of each layer's parameter gradient",
              "Compare how much gradient each layer's own parameters receive, early and late in the network.",
              "Three log-scale line charts of parameter-gradient norm against relative depth "
              "at the first, middle and last recorded step."),
    ]))
    out.append(Section("heatmaps", "Layers over training", [
        embed(figures.layer_step_heatmap(layers[layers.run == label]), label,
              "Each row is a layer in network order, each column a recorded step; dark rows receive little gradient.",
              f"Heatmap of the RMS output gradient of every layer of run {label} across training steps, "
              "log colour scale.")
        for label in data.labels if (layers.run == label).any()
    ], intro="" if len(layers) else "No training step recorded yet."))
    coord = coord_table(data.runs)
    if len(coord):
        out.append(Section("coord-check", "Coordinate check: activation size against width", [
            embed(figures.coord_check(rows), group,
                  "As in muP's coordinate check (Yang et al. 2021, Fig. 5): under a width-stable parameterisation "
                  "every line stays flat after the first steps; lines rising to the right grow with width.",
                  f"Log-log line charts of each layer's activation RMS against width for {group}, one panel per "
                  "step from initialisation, coloured by depth.")
            for group, rows in coord.groupby("group", sort=True)]))
    out.append(Section("activations", "Activation statistics by depth", [embed(
        figures.activation_std_by_depth(layers), "",
        "As in He et al. 2015 Fig. 7: after training, residual networks' responses are smaller than plain ones'.",
        "Two line charts of the standard deviation of layer responses, in network order and sorted by magnitude.")]))
    if len(blocks):
        identity = [embed(figures.identity_by_depth(blocks), "by depth, at the last recorded step",
                          "Residual blocks sit near the identity (small ||y-x||/||x||, gradient ratio near 1); "
                          "plain blocks do not.",
                          "Three line charts against relative block depth: relative residual, "
                          "gradient ratio on a log scale, and branch ratio."),
                    embed(figures.identity_over_training(blocks), "over training",
                          "Watch whether blocks drift toward or away from the identity as training goes on; "
                          "token cosine near 1 means rank collapse.",
                          "Line charts of the mean over blocks of identity-closeness measures against step, "
                          "one line per run.")]
        out.append(Section("identity", "Identity closeness", identity))
    else:
        out.append(Section("identity", "Identity closeness", intro="No blocks were measured in these runs."))
    attribution = data.attribution
    if len(attribution):
        out.append(Section("attribution", "Attribution flow", [
            embed(figures.attribution_by_depth(attribution, "attr_abs", "|attribution|", log=True),
                  "attribution of each block's output to the target score (sum of |attribution| over units)",
                  "How much the output depends on each block's output, by Captum on a fixed probe batch; "
                  "compare how it changes with depth and between first and last checkpoint.",
                  "Two log-scale line charts of the absolute attribution of each block's output against relative "
                  "block depth, at the first and the last attribution checkpoint, one line per run."),
            embed(figures.attribution_by_depth(attribution, "branch_share", "branch share", log=False),
                  "share of the attribution at each addition carried by the residual branch (the rest by the skip)",
                  "Near 0: the block passes its input on and its branch barely matters; 1: everything goes "
                  "through the branch (plain networks have no skip).",
                  "Two line charts of the branch share of attribution against relative block depth, at the first "
                  "and the last checkpoint, one line per run."),
        ], intro=_attribution_intro(data)))
    else:
        out.append(Section("attribution", "Attribution flow", intro="No attribution checkpoints in these runs "
                           "(record them with gradscope run --attribution-every M, or watch(attribution=...))."))
    out.extend(analysis_sections(data))
    for section in out:
        section.note = dropped_note(data, section.id)
    return out


#: The analyses' sections (``gradscope analyse``): table, section id, title, figure, its title,
#: the two-sentence caption, the figure's description.
ANALYSES = (
    ("shattering", "shattering", "Shattered gradients", figures.shattering,
     "dL/dx along a line of inputs, at each checkpoint",
     "Balduzzi et al. 2017: in a deep plain network the input gradient at neighbouring inputs is nearly "
     "unrelated, like white noise (autocorrelation near 0, flat spectrum). Skip connections keep it "
     "correlated (near 1, spectrum slope toward -2), so a step that helps one input helps its neighbours.",
     "Two line charts against checkpoint step, one line per run: the lag-1 autocorrelation of the input "
     "gradient along the line, and the slope of its power spectrum on log-log axes."),
    ("lesion", "lesion", "Lesion study", figures.lesion, "held-out loss with each block replaced by the identity",
     "Veit et al. 2016: a trained residual network loses little without any one block, because it acts like "
     "an ensemble of paths of different lengths. A plain network has one path, so removing any layer of it "
     "breaks the model and its loss jumps.",
     "Line chart on a symmetric log scale (linear within 0.001 of 0) of the loss increase against the "
     "block's relative position, one line per run; blocks that change shape cannot be replaced and are "
     "left out."),
    ("noise_scale", "noise-scale", "Gradient noise scale", figures.noise_scale,
     "B_simple = tr(Sigma) / |G|^2 over training",
     "McCandlish et al. 2018: the batch size at which gradient noise and signal are about equal. Training "
     "with batches far above it buys little per extra sample, far below it wastes steps.",
     "Log-scale line chart of the smoothed simple noise scale against step, one line per run, with a dotted "
     "line at the batch size each run trained with."),
)


def analysis_sections(data: ReportData) -> list[Section]:
    """A section for each analysis some run holds (``gradscope analyse``); none where no run does."""
    return [Section(section, title, [embed(figure(getattr(data, table)), subtitle, caption, alt)])
            for table, section, title, figure, subtitle, caption, alt in ANALYSES if len(getattr(data, table))]


def _attribution_intro(data: ReportData) -> str:
    methods = sorted({str((r.meta.get("attribution") or {}).get("method")) for r in data.runs
                      if r.meta.get("attribution")})
    return (f"Captum {', '.join(methods)} on each run's probe batch, in eval mode and outside the training "
            "step; scores are each probe sample's target logit.")


def build(runs: Sequence[RunLike], out: str | os.PathLike[str] = "report.html", title: str | None = None) -> Path:
    """Write a self-contained HTML report comparing ``runs`` (Run objects or run directories).

    The page goes to a temporary file beside ``out``, renamed over it once whole, so a reader
    never sees half a report; on any failure the temporary file is removed.

    Raises:
        ValueError: ``out`` is an existing directory (checked before any work), or no runs.
        RunError: a run cannot be read; the message names it.
    """
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"report output {path} is a directory; give a file name, e.g. {path / 'report.html'}")
    data = collect(runs)
    env = environment()
    env.filters["num"] = _num
    html = env.get_template("report.html.j2").render(
        title=title or "gradscope report: " + ", ".join(data.labels), version=__version__,
        created=dt.datetime.now().strftime("%Y-%m-%d %H:%M"), summaries=data.summaries,
        findings=diagnose(data.runs), sections=sections(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: two builds never share one
    try:
        tmp.write_text(html, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


__all__ = ["build", "collect", "figures"]
