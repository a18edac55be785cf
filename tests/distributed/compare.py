"""One-process references of the scenarios, and the comparison of two runs' tables."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))
import scenarios  # noqa: E402

import gradscope  # noqa: E402
from gradscope.recording.layers import with_activations  # noqa: E402

KEYS = {"layers": ["step", "phase", "layer"], "blocks": ["step", "block"], "scalars": ["step"]}


def reference(path: Path, kind: str = "mlp", *, every: int = 1, flush_every: int = 3, eval_at: int | None = None,
              optimizer: bool = True) -> gradscope.Run:
    """The scenario's model trained in one process on the whole global batch."""
    model = scenarios.make_model(kind)
    opt = scenarios.optimizer(model)
    with gradscope.watch(model, run=path, every=every, flush_every=flush_every, modules=with_activations,
                         optimizer=opt if optimizer else None) as rec:
        scenarios.train(model, opt, rec, scenarios.batches(), eval_at=eval_at)
    return gradscope.load_run(path)


def table(run: gradscope.Run, name: str) -> pd.DataFrame:
    frame = getattr(run, name)
    keys = KEYS[name]
    numeric = [c for c in frame.columns if c not in keys and frame[c].dtype.kind == "f" and c not in
               ("depth", "rel_depth")]
    return frame[keys + numeric].sort_values(keys, ignore_index=True)


def assert_same(run: gradscope.Run, ref: gradscope.Run, name: str, columns: list[str] | None = None,
                rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Same rows (keys) and the same values, to ``rtol``, column by column (NaN where NaN)."""
    a, b = table(run, name), table(ref, name)
    keys = KEYS[name]
    assert a[keys].astype(str).values.tolist() == b[keys].astype(str).values.tolist(), f"{name}: rows differ"
    for column in columns or [c for c in b.columns if c not in keys]:
        np.testing.assert_allclose(a[column].to_numpy(float), b[column].to_numpy(float), rtol=rtol, atol=atol,
                                   equal_nan=True, err_msg=f"{name}.{column}")
