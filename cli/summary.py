"""A run as text for the terminal: what was trained, how it ended, and gradient flow by layer."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gradscope import Finding, Run
from gradscope.analysis.findings import training_steps


def _fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.3g}"


def _pick_rows(frame: pd.DataFrame, limit: int | None) -> tuple[pd.DataFrame, str]:
    """Evenly spaced rows (first and last kept) when there are more than ``limit``."""
    if limit is None or len(frame) <= limit:
        return frame, ""
    idx = np.unique(np.linspace(0, len(frame) - 1, limit).round().astype(int))
    return frame.iloc[idx], f"  (showing {len(idx)} of {len(frame)}; --all for every one)\n"


def run_summary(run: Run, limit: int | None = 16) -> str:
    meta = run.meta
    model = meta.get("model", {})
    task = (meta.get("task") or {}).get("name", "-")
    lines = [f"run {run.path}",
             f"  model {model.get('registry_name') or model.get('class')} ({model.get('parameters', 0):,} parameters), "
             f"task {task}, status {run.status}"]
    s = run.scalars
    trained = training_steps(s)
    if len(trained):
        last = trained.iloc[-1]
        evals = s.dropna(subset=["eval_accuracy"])
        final_eval = evals.iloc[-1]["eval_accuracy"] if len(evals) else float("nan")
        lines.append(f"  {len(trained)} recorded training steps ({int(trained.step.min())} to {int(last.step)}), "
                     f"every {meta.get('schedule', {}).get('every', '?')}; last: loss {_fmt(last['loss'])}, "
                     f"accuracy {_fmt(last['accuracy'])}, held-out accuracy {_fmt(final_eval)}")
    train = run.layers[run.layers.phase == "train"]
    if train.empty:
        lines.append("  no training step recorded yet")
        return "\n".join(lines) + "\n"
    step = int(train.step.max())
    at = train[train.step == step].sort_values("depth")
    shown, note = _pick_rows(at, limit)
    table = pd.DataFrame({
        "depth": shown.depth.astype("Int64"), "layer": shown.layer, "type": shown.type,
        "act_std": shown.act_std.map(_fmt), "grad_out_rms": shown.grad_out_rms.map(_fmt),
        "grad_norm": shown.grad_norm.map(_fmt), "update_ratio": shown.update_ratio.map(_fmt),
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
    return "\n".join(lines) + "\n"


def findings_text(findings: list[Finding]) -> str:
    """Findings as an indented list, most severe first."""
    if not findings:
        return "findings: none (no rule fired)\n"
    lines = [f"findings ({len(findings)}):"]
    for f in findings:
        lines.append(f"  [{f.severity}] {f.run}: {f.title}")
        lines.append(f"      {f.explanation}")
    return "\n".join(lines) + "\n"
