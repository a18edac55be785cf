"""Runs gathered for a report: one tidy frame per table, labelled by run, plus each run's summary."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradscope import Run, load_run
from gradscope.analysis.findings import training_steps

RunLike = Run | str | os.PathLike[str]


@dataclass
class RunSummary:
    """One row of the report's summary table; ``notes`` are shown next to it as warnings."""

    label: str
    model: str
    task: str
    depth: Any
    parameters: int
    status: str
    steps: int
    final_loss: float
    final_accuracy: float
    eval_accuracy: float
    grad_first_last: float  # ||dL/dy|| at the first layer over the last, at the last step
    mean_id_rel_residual: float
    notes: list[str] = field(default_factory=list)


@dataclass
class ReportData:
    runs: list[Run]
    labels: list[str]
    layers: pd.DataFrame  # training rows of every run, with a "run" column
    blocks: pd.DataFrame
    scalars: pd.DataFrame
    summaries: list[RunSummary]
    attribution: pd.DataFrame = field(default_factory=pd.DataFrame)


def _labels(runs: list[Run]) -> list[str]:
    """Run directory names, made unique with their parent folder where two collide."""
    names = [r.path.name for r in runs]
    out = []
    for r, name in zip(runs, names):
        label = name if names.count(name) == 1 else f"{r.path.parent.name}/{name}"
        while label in out:
            label += "'"
        out.append(label)
    return out


def _last(frame: pd.DataFrame, column: str) -> float:
    values = frame[column].dropna()
    return float(values.iloc[-1]) if len(values) else math.nan


def _nonfinite_note(frame: pd.DataFrame, what: str) -> str | None:
    numeric = frame.select_dtypes("number").drop(columns=["step", "depth", "rel_depth"], errors="ignore")
    bad = ~np.isfinite(numeric.to_numpy(dtype=float)) & numeric.notna().to_numpy()
    if not bad.any():
        return None
    rows = bad.any(axis=1)
    cols = [c for c, b in zip(numeric.columns, bad.any(axis=0)) if b]
    return f"non-finite {what} values (inf) in {', '.join(cols)} from step {int(frame.step[rows].min())}"


def summarise(run: Run, label: str) -> RunSummary:
    meta, s = run.meta, run.scalars
    trained = training_steps(s)
    train = run.layers[run.layers.phase == "train"]
    last_step = int(train.step.max()) if len(train) else None
    ratio = math.nan
    if last_step is not None:
        g = train[train.step == last_step].sort_values("depth").grad_out_norm.dropna()
        if len(g) > 1 and g.iloc[-1] > 0:
            ratio = float(g.iloc[0] / g.iloc[-1])
    blocks_last = run.blocks[run.blocks.step == run.blocks.step.max()] if len(run.blocks) else run.blocks
    model = meta.get("model", {})
    notes = []
    if run.status != "finished":
        notes.append(f"status is '{run.status}': the run was still going or died; "
                     f"showing steps up to {int(trained.step.max()) if len(trained) else 0}")
    for frame, what in ((trained, "loss"), (train, "layer"), (run.blocks, "block")):
        note = _nonfinite_note(frame, what) if len(frame) else None
        if note:
            notes.append(note)
    bad_loss = ~np.isfinite(trained.loss.to_numpy(dtype=float)) & trained.loss.notna().any()
    if len(trained) and bad_loss.any():
        notes.append(f"the loss is NaN or inf from step {int(trained.step[bad_loss].min())}")
    return RunSummary(
        label=label, model=str(model.get("registry_name") or model.get("class", "?")),
        task=str((meta.get("task") or {}).get("name", "-")), depth=model.get("depth") or "-",
        parameters=int(model.get("parameters", 0)), status=run.status, steps=len(trained),
        final_loss=_last(trained, "loss"), final_accuracy=_last(trained, "accuracy"),
        eval_accuracy=_last(s, "eval_accuracy"), grad_first_last=ratio,
        mean_id_rel_residual=float(blocks_last.id_rel_residual.mean()) if len(blocks_last) else math.nan,
        notes=notes,
    )


def collect(runs: Sequence[RunLike]) -> ReportData:
    """Load (where given paths) and label runs; raises RunError naming any unreadable one."""
    loaded = [r if isinstance(r, Run) else load_run(Path(r)) for r in runs]
    if not loaded:
        raise ValueError("a report needs at least one run")
    labels = _labels(loaded)

    def stack(frames: list[pd.DataFrame]) -> pd.DataFrame:
        tagged = [f.assign(run=label) for f, label in zip(frames, labels)]
        return pd.concat(tagged, ignore_index=True) if tagged else pd.DataFrame()

    layers = stack([r.layers[r.layers.phase == "train"] for r in loaded])
    return ReportData(
        runs=loaded, labels=labels, layers=layers, blocks=stack([r.blocks for r in loaded]),
        scalars=stack([r.scalars for r in loaded]),
        summaries=[summarise(r, label) for r, label in zip(loaded, labels)],
        attribution=stack([r.attribution for r in loaded]),
    )
