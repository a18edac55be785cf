"""Runs gathered for a report: one tidy frame per table, labelled by run, plus each run's summary."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gradscope import Run, load_run
from gradscope.analysis.findings import non_finite_cells, non_finite_items, non_finite_kinds, training_steps

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
    #: what ``gradscope analyse`` stored: each analysis's table of every run, with a "run" column
    shattering: pd.DataFrame = field(default_factory=pd.DataFrame)
    lesion: pd.DataFrame = field(default_factory=pd.DataFrame)
    noise_scale: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: per run label, the measured NaN and inf cells of each table (``findings.non_finite_cells``)
    non_finite: dict[str, dict[str, pd.DataFrame]] = field(default_factory=dict)


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


#: Layers or blocks named in one note before "and N more".
NOTE_NAMES = 3


def non_finite_text(run: Run, cells: dict[str, pd.DataFrame], table: str,
                    columns: tuple[str, ...] | None = None) -> str | None:
    """What of ``table`` is a measured NaN or inf (only its rows in ``cells[table]``, only
    ``columns`` if given), in words: "NaN in loss from step 3", or "act_std of layer x (Linear)
    (inf) from step 0"."""
    mask = cells[table]
    if columns is not None:
        mask = mask[[c for c in columns if c in mask]]
    if mask.empty or not mask.to_numpy().any():
        return None
    frame = getattr(run, table).loc[mask.index]
    if table == "scalars":
        parts = []
        for c in mask.columns[mask.any().to_numpy()]:
            hit = mask[c].to_numpy()
            kinds = non_finite_kinds(frame[c].to_numpy(dtype=float)[hit])
            parts.append(f"{kinds} in {c} from step {int(frame.step[hit].min())}")
        return "; ".join(parts)
    key = "layer" if table == "layers" else "block"
    items = non_finite_items(frame, mask, key)
    named = [f"{', '.join(i['statistics'])} of {key} {i['name']} ({i['type']}) ({i['kinds']}) from step "
             f"{i['first_step']}" for i in items[:NOTE_NAMES]]
    if len(items) > NOTE_NAMES:
        named.append(f"{len(items) - NOTE_NAMES} more {key}s")
    return "; ".join(named)


def summarise(run: Run, label: str, cells: dict[str, pd.DataFrame] | None = None) -> RunSummary:
    meta, s = run.meta, run.scalars
    cells = non_finite_cells(run) if cells is None else cells
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
    for table, what in (("scalars", "training"), ("layers", "layer"), ("blocks", "block")):
        text = non_finite_text(run, cells, table)
        if text:
            notes.append(f"non-finite {what} values: {text} (measured, not missing; the figures leave them out)")
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
    cells = [non_finite_cells(r) for r in loaded]
    return ReportData(
        runs=loaded, labels=labels, layers=layers, blocks=stack([r.blocks for r in loaded]),
        scalars=stack([r.scalars for r in loaded]),
        summaries=[summarise(r, label, c) for r, label, c in zip(loaded, labels, cells)],
        attribution=stack([r.attribution for r in loaded]), non_finite=dict(zip(labels, cells)),
        **{name: stack([getattr(r, name) for r in loaded]) for name in ("shattering", "lesion", "noise_scale")},
    )
