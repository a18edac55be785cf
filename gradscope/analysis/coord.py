"""The coordinate check of muP (Yang et al. 2021, Fig. 5): each layer's activation size against width.

A parameterisation that transfers across widths keeps every layer's typical activation (its RMS)
the same at every width, at initialisation and after the first updates. Under the standard one
trained with Adam, an update moves a layer's output by about lr x fan-in, so the outputs of layers
with a wide input (the readout above all) grow with width once training starts. Runs recorded by
``gradscope.coord_check`` carry ``meta["coord_check"] = {"group", "width"}``; here they become a
table of act_rms by width and the slope of log(act_rms) against log(width) per layer and step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradscope.store import Run

#: A layer whose act_rms grows faster than width**DEFAULT_MAX_SLOPE after training starts is flagged.
#: Flat is 0; the standard parameterisation's readout under Adam measures about 0.4-1.
DEFAULT_MAX_SLOPE = 0.25


def coord_table(runs: Sequence[Run]) -> pd.DataFrame:
    """Training rows of the coordinate-check runs: group, width, step, layer, rel_depth, act_rms."""
    frames = []
    for run in runs:
        check = run.meta.get("coord_check")
        if not isinstance(check, dict) or "width" not in check:
            continue
        rows = run.layers[run.layers.phase == "train"][["step", "layer", "act_rms"]].copy()
        depth = run.layer_table.set_index("name").rel_depth
        rows["rel_depth"] = rows.layer.map(depth).astype(float)
        rows["group"], rows["width"] = str(check.get("group", "model")), int(check["width"])
        frames.append(rows)
    columns = ["group", "width", "step", "layer", "rel_depth", "act_rms"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def width_slopes(table: pd.DataFrame) -> pd.DataFrame:
    """Least-squares slope of log(act_rms) on log(width), per group, step and layer (>= 2 widths)."""
    out = []
    finite = table[np.isfinite(table.act_rms.astype(float)) & (table.act_rms > 0)]
    for (group, step, layer), rows in finite.groupby(["group", "step", "layer"], sort=True):
        if rows.width.nunique() < 2:
            continue
        slope = np.polyfit(np.log(rows.width.to_numpy(float)), np.log(rows.act_rms.to_numpy(float)), 1)[0]
        out.append((group, int(step), layer, float(rows.rel_depth.iloc[0]), float(slope), rows.width.nunique()))
    return pd.DataFrame(out, columns=["group", "step", "layer", "rel_depth", "slope", "widths"])


def growing_layers(runs: Sequence[Run], max_slope: float = DEFAULT_MAX_SLOPE) -> list[dict[str, Any]]:
    """Per group, the layers whose act_rms grows with width faster than ``width**max_slope`` at
    some step after the first update (step >= 1), steepest first, with that step and slope."""
    table = coord_table(runs)
    slopes = width_slopes(table)
    trained = slopes[slopes.step >= 1]
    out = []
    for group, rows in trained.groupby("group", sort=True):
        worst = rows.loc[rows.groupby("layer").slope.idxmax()]
        flagged = worst[worst.slope > max_slope].sort_values("slope", ascending=False)
        widths = sorted(int(w) for w in table[table.group == group].width.unique())
        out.append({"group": group, "widths": widths, "max_slope": max_slope,
                    "layers": [{"layer": r.layer, "step": int(r.step), "slope": float(r.slope)}
                               for r in flagged.itertuples()]})
    return out
