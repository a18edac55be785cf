"""Adding an analysis table to a run that is no longer being written (``gradscope analyse``).

An analysis of a trained model comes after its run closed. It takes the run's lock, so it never
writes beside a live recorder (that one is given the table instead: ``Recorder.write_table``),
writes one more Parquet part and counts it in meta.json, which is replaced atomically: a reader
sees the run with or without the new part, never half of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gradscope.store.lock import RunLock
from gradscope.store.meta import META_FILE, RunError, atomic_write, read_meta, write_json
from gradscope.store.schema import ANALYSES, frame_dtypes

_ARROW = {"int64": pa.int64(), "float64": pa.float64(), "float32": pa.float32(), "bool": pa.bool_(),
          "object": pa.string()}


def analysis_table(table: str, frame: pd.DataFrame) -> pa.Table:
    """``frame`` as the Arrow table of analysis ``table``: its columns in the schema's order and
    types; a column the frame lacks is missing (null), a column the schema lacks is an error."""
    if table not in ANALYSES:
        raise ValueError(f"unknown analysis table {table!r}; analyses store {', '.join(ANALYSES)}")
    dtypes = frame_dtypes(table)
    extra = [c for c in frame.columns if c not in dtypes]
    if extra:
        raise ValueError(f"table {table!r} has no column {', '.join(map(repr, extra))}")
    columns: dict[str, Any] = {}
    for name, dtype in dtypes.items():
        values = frame[name] if name in frame else pd.Series([None] * len(frame), dtype=object)
        if dtype in ("float64", "float32"):
            values = pd.to_numeric(values, errors="coerce").astype(np.float64)
        columns[name] = pa.array(values, _ARROW[dtype], from_pandas=True)
    return pa.table(columns)


def append_analysis(path: str | os.PathLike[str], table: str, frame: pd.DataFrame) -> Path:
    """Add ``frame`` to the closed run at ``path`` as one more part of ``table``; returns the part.

    Raises ``RunLockedError`` while a recorder writes the run, ``RunNotFoundError`` where there is none.
    """
    path = Path(path)
    data = analysis_table(table, frame)
    read_meta(path)  # a run, and one this release reads
    lock = RunLock.acquire(path)
    try:
        meta = read_meta(path)  # again, under the lock: the writer may have finished meanwhile
        parts = meta.get("parts")
        folder = path / table
        if not isinstance(parts, dict):  # a run written before meta.json counted parts: all are read
            parts = None
            number = len(list(folder.glob("part-*.parquet"))) if folder.is_dir() else 0
        else:
            number = parts.get(table, 0)
            if not isinstance(number, int):
                raise RunError(f"{path / META_FILE} is damaged: 'parts' should map tables to part counts")
        folder.mkdir(exist_ok=True)
        part = folder / f"part-{number:06d}.parquet"
        atomic_write(part, lambda p: pq.write_table(data, p))
        if parts is not None:
            write_json(path / META_FILE, {**meta, "parts": {**parts, table: number + 1}})
        return part
    finally:
        lock.release()
