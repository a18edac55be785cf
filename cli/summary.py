"""A run as text for the terminal: what was trained, how it ended, and gradient flow by layer.

Everything a run's files say (layer and block names, types, the run's name and path, task and
model names, findings that quote them) is untrusted text: printed raw, an escape sequence in a
layer name could retitle the terminal or clear it. ``safe`` shows every control character
escaped instead, and the whole text passes it once more before it leaves (``terminal_text``).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import pandas as pd

from gradscope import Finding, Run
from gradscope.analysis.findings import non_finite_cells, training_steps

#: C0 controls (newline and tab too: a name has no business breaking a line), DEL, C1 controls
#: (which include the 8-bit CSI and OSC), and the bidirectional overrides and isolates, which
#: reorder what a terminal shows without being visible themselves.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(value: Any) -> str:
    """``str(value)`` with every control character shown as an escape (ESC as ``\\x1b``)."""
    return _CONTROL.sub(_escape, str(value))


def terminal_text(text: str) -> str:
    """A block of lines built here, made safe line by line (its own newlines kept)."""
    return "\n".join(safe(line) for line in text.split("\n"))


def _fmt(x: Any, non_finite: bool = False) -> str:
    """A number; ``nan``/``inf`` where the value is a measured NaN or inf (``non_finite``, or
    any inf), ``-`` where nothing was recorded."""
    if x is None:
        return "-"
    if isinstance(x, (float, np.floating)):
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        if math.isnan(x):
            return "nan" if non_finite else "-"
    if isinstance(x, (int, float, np.number)) and not isinstance(x, bool):
        return f"{x:.3g}"
    return safe(x)


def _column(frame: pd.DataFrame, mask: pd.DataFrame, column: str) -> list[str]:
    flags = mask[column].reindex(frame.index, fill_value=False) if column in mask else \
        pd.Series(False, index=frame.index)
    return [_fmt(v, bool(f)) for v, f in zip(frame[column].to_numpy(dtype=float), flags.to_numpy())]


def _pick_rows(frame: pd.DataFrame, limit: int | None) -> tuple[pd.DataFrame, str]:
    """Evenly spaced rows (first and last kept) when there are more than ``limit``."""
    if limit is None or len(frame) <= limit:
        return frame, ""
    idx = np.unique(np.linspace(0, len(frame) - 1, limit).round().astype(int))
    return frame.iloc[idx], f"  (showing {len(idx)} of {len(frame)}; --all for every one)\n"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else safe(value)


def run_summary(run: Run, limit: int | None = 16) -> str:
    meta = run.meta
    model = meta.get("model", {})
    task = (meta.get("task") or {}).get("name", "-")
    cells = non_finite_cells(run)
    lines = [f"run {safe(run.path)}",
             f"  model {safe(model.get('registry_name') or model.get('class'))} "
             f"({_count(model.get('parameters', 0))} parameters"
             f"{', compiled' if (meta.get('env') or {}).get('compiled') else ''}), task {safe(task)}, "
             f"status {safe(run.status)}"]
    s = run.scalars
    trained = training_steps(s)
    if len(trained):
        last = trained.index[-1]
        flagged = cells["scalars"]
        evals = s.dropna(subset=["eval_accuracy"])
        final_eval = _fmt(evals.iloc[-1]["eval_accuracy"]) if len(evals) else "-"
        lines.append(f"  {len(trained)} recorded training steps ({int(trained.step.min())} to "
                     f"{int(trained.step.loc[last])}), every {safe(meta.get('schedule', {}).get('every', '?'))}; "
                     f"last: loss {_fmt(s.loss.loc[last], bool(flagged.loss.get(last, False)))}, "
                     f"accuracy {_fmt(s.accuracy.loc[last], bool(flagged.accuracy.get(last, False)))}, "
                     f"held-out accuracy {final_eval}")
    train = run.layers[run.layers.phase == "train"]
    if train.empty:
        lines.append("  no training step recorded yet")
        return terminal_text("\n".join(lines)) + "\n"
    step = int(train.step.max())
    at = train[train.step == step].sort_values("depth")
    shown, note = _pick_rows(at, limit)
    mask = cells["layers"]
    table = pd.DataFrame({
        "depth": shown.depth.astype("Int64"), "layer": shown.layer.map(safe), "type": shown.type.map(safe),
        **{c: _column(shown, mask, c) for c in ("act_std", "grad_out_rms", "grad_norm", "update_ratio")},
    })
    lines.append(f"\nlayers at step {step} (training):")
    lines.append(table.to_string(index=False))
    if note:
        lines.append(note.rstrip())
    g = at.grad_out_norm.dropna()
    if len(g) > 1 and g.iloc[-1] > 0:
        lines.append(f"  gradient flowing back, ||dL/dy||, at the first layer is {g.iloc[0] / g.iloc[-1]:.3g} "
                     "x the last layer's")
    blocks = run.blocks[run.blocks.step == step]
    if len(blocks):
        lines.append(f"\nblocks at step {step}: {len(blocks)}; "
                     f"mean id_rel_residual {_fmt(blocks.id_rel_residual.mean())}, "
                     f"mean id_cos {_fmt(blocks.id_cos.mean())}, "
                     f"mean id_grad_ratio {_fmt(blocks.id_grad_ratio.mean())}")
        go = blocks.grad_out_norm.dropna()
        if len(go) > 1 and go.iloc[-1] > 0:
            lines.append(f"  gradient norm at the first block's output is {go.iloc[0] / go.iloc[-1]:.3g} "
                         "x the last block's")
        if blocks.token_cos.notna().any():
            lines.append("  token_cos (rank collapse toward 1) at the last block: "
                         f"{_fmt(blocks.token_cos.dropna().iloc[-1])}")
    return terminal_text("\n".join(lines)) + "\n"


def findings_text(findings: list[Finding]) -> str:
    """Findings as an indented list, most severe first."""
    if not findings:
        return "findings: none (no rule fired)\n"
    lines = [f"findings ({len(findings)}):"]
    for f in findings:
        lines.append(f"  [{safe(f.severity)}] {safe(f.run)}: {safe(f.title)}")
        lines.append(f"      {safe(f.explanation)}")
    return terminal_text("\n".join(lines)) + "\n"
