"""The run directory's writer: Parquet parts and meta.json, in order, on a daemon thread.

A run is JSON plus Parquet, never pickle, so it can be read by pandas, DuckDB or Spark directly
and loading it cannot execute code. The training thread only hands over jobs (``parts.FlushJob``)
whose device-to-host copies may still be in flight; the thread turns them into tables and
writes each as a new part, under a temporary name and renamed.
"""

from __future__ import annotations

import os
import queue
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from gradscope.store.meta import META_FILE, RunError, atomic_write, write_json
from gradscope.store.schema import TABLES


class Job(Protocol):
    """Anything that becomes tables on the writer thread (``parts.FlushJob``, ``parts.AttributionJob``)."""

    def tables(self) -> dict[str, pa.Table]: ...


class RunWriter:
    """Owns one run directory; writes parts and meta.json in order on a daemon thread."""

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.path = Path(path)
        _prepare_directory(self.path, overwrite)
        self._parts = {t: 0 for t in TABLES}
        self._queue: queue.Queue[Any] = queue.Queue()
        self._errors: list[str] = []
        self._thread = threading.Thread(target=self._loop, name=f"gradscope-writer:{self.path}",
                                        daemon=True)
        self._thread.start()

    def write_meta_now(self, meta: dict[str, Any]) -> None:
        write_json(self.path / META_FILE, meta)

    def submit_meta(self, meta: dict[str, Any]) -> None:
        self._queue.put(("meta", meta))

    def submit(self, job: Job) -> None:
        self._queue.put(("parts", job))

    def wait(self) -> None:
        """Block until everything submitted is on disk; raise if anything failed to write."""
        self._queue.join()
        self._raise_errors()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._raise_errors()

    def _raise_errors(self) -> None:
        if self._errors:
            errors, self._errors = self._errors, []
            raise RunError(f"gradscope could not write run {self.path}: " + "; ".join(errors))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                kind, payload = item
                if kind == "meta":
                    self.write_meta_now(payload)
                else:
                    for table, data in payload.tables().items():
                        self._write_part(table, data)
            except Exception as exc:  # keep writing later parts; report at wait()/close()
                self._errors.append(f"{type(exc).__name__}: {exc}")
                warnings.warn(f"gradscope: writing run {self.path} failed: {exc}", RuntimeWarning,
                              stacklevel=1)
            finally:
                self._queue.task_done()

    def _write_part(self, table: str, data: pa.Table) -> None:
        folder = self.path / table
        folder.mkdir(exist_ok=True)
        part = folder / f"part-{self._parts[table]:06d}.parquet"
        self._parts[table] += 1
        atomic_write(part, lambda p: pq.write_table(data, p))


def _prepare_directory(path: Path, overwrite: bool) -> None:
    """Create the run directory; refuse to mix two runs' data unless asked to replace it."""
    if path.exists() and not path.is_dir():
        raise RunError(f"run path {path} exists and is not a directory")
    ours = [path / META_FILE, *(path / t for t in TABLES)]
    if any(p.exists() for p in ours):
        if not overwrite:
            raise FileExistsError(
                f"{path} already holds a gradscope run; pass overwrite=True to replace it, "
                "or choose another run= path")
        for p in ours:
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    path.mkdir(parents=True, exist_ok=True)
