"""Where an analysis's rows go: the run a recorder is writing, or a closed run on disk."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from gradscope.recording.recorder import Recorder
from gradscope.store.appending import append_analysis


def save(run: Recorder | str | os.PathLike[str], table: str, frame: pd.DataFrame) -> Path:
    """Store ``frame`` as analysis ``table`` (``shattering``, ``lesion`` or ``noise_scale``) in ``run``:
    through its recorder while one writes it (rank 0's rows under several processes), else
    appended to the run on disk. Rows of a step stored before are replaced (the last stored wins)."""
    if isinstance(run, Recorder):
        run.write_table(table, frame)
        return run.path
    append_analysis(run, table, frame)
    return Path(run)
