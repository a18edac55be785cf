"""The run directory's writer: Parquet parts and meta.json, in order, on a daemon thread.

A run is JSON plus Parquet, never pickle, so it can be read by pandas, DuckDB or Spark directly
and loading it cannot execute code. The training thread only hands over jobs (``parts.FlushJob``)
whose device-to-host copies may still be in flight; the thread turns them into tables and
writes each as a new part, under a temporary name and renamed.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from gradscope.store.lock import LOCK_FILE, RunLock
from gradscope.store.meta import META_FILE, MODEL_FILE, RunError, atomic_write, write_json
from gradscope.store.schema import TABLES


class Job(Protocol):
    """Anything that becomes tables on the writer thread (``parts.FlushJob``, ``parts.AttributionJob``)."""

    def tables(self) -> dict[str, pa.Table]: ...


class RunWriter:
    """The one writer of a run directory: holds its lock, writes parts and meta.json in order.

    Parts are written on a daemon thread. Write errors do not stop training: they are collected
    (each distinct one once, with a count and the steps it cost) and the run's final status says
    ``failed`` with them, since a run is ``finished`` only when every recorded step reached disk.
    """

    def __init__(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        self.path = Path(path)
        self._parts = {t: 0 for t in TABLES}  # parts numbered below these are written (or failed)
        self._created = _make_directory(self.path)
        try:
            self._lock = RunLock.acquire(self.path)
        except BaseException:
            self._remove_if_created()
            raise
        try:
            _prepare_directory(self.path, overwrite)
        except BaseException:
            self._release(remove=True)
            raise
        self._queue: queue.Queue[Any] = queue.Queue()
        self._errors: dict[str, int] = {}  # distinct message -> times it happened
        self._raised = 0  # errors wait() has raised already
        self._lost: list[tuple[int, int]] = []  # (first, last) step of each flush that failed to write
        self._thread: threading.Thread | None = None

    def start(self, meta: dict[str, Any]) -> None:
        """Write the first meta.json and start the writer thread; on failure leave nothing behind."""
        try:
            self._write_meta(meta)
        except BaseException as exc:
            self._release(remove=True)
            if isinstance(exc, OSError):
                raise RunError(f"gradscope could not write run {self.path}: {exc.strerror or exc}") from exc
            raise
        self._thread = threading.Thread(target=self._loop, name=f"gradscope-writer:{self.path}", daemon=True)
        self._thread.start()

    def submit_meta(self, meta: dict[str, Any]) -> None:
        self._queue.put(("meta", meta))

    def submit(self, job: Job) -> None:
        self._queue.put(("parts", job))

    def wait(self) -> None:
        """Block until everything submitted is on disk; raise if anything failed to write since the
        last ``wait()`` (errors already raised are not raised again, but stay for the final status)."""
        self._queue.join()
        new = sum(self._errors.values())
        if new > self._raised:
            self._raised = new
            raise RunError(f"gradscope could not write run {self.path}: {self.error_summary()}")

    def errors(self) -> list[str]:
        """Each distinct write error once, with how often it happened and the steps it cost."""
        out = [f"{message} ({count} times)" if count > 1 else message for message, count in self._errors.items()]
        if self._lost:
            out.append("steps not written: " + ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in self._lost))
        return out

    def error_summary(self) -> str:
        return "; ".join(self.errors())

    def finish(self, final_meta: Callable[[list[str]], dict[str, Any]]) -> None:
        """After everything submitted is written: the final meta.json, ``final_meta(errors())``."""
        self._queue.join()
        try:
            self._write_meta(final_meta(self.errors()))
        except Exception as exc:  # e.g. the disk is full: meta.json keeps status "running",
            self._note_error(f"meta.json: {type(exc).__name__}: {exc}")  # which readers show as interrupted

    def close(self) -> None:
        """Stop the thread and release the lock; raise ``RunError`` if anything failed to write."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self._release(remove=False)
        if self._errors:
            errors, self._errors = self.error_summary(), {}
            raise RunError(f"gradscope could not write all of run {self.path}: {errors}")

    def _release(self, remove: bool) -> None:
        if remove and self._lock.held:  # a failed start: the lock file and a directory we made
            with contextlib.suppress(OSError):
                (self.path / LOCK_FILE).unlink()
        self._lock.release()
        if remove:
            self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self._created:
            with contextlib.suppress(OSError):
                self.path.rmdir()  # only if empty: never anything but what we made

    def _note_error(self, message: str) -> None:
        if message not in self._errors:
            warnings.warn(f"gradscope: writing run {self.path} failed: {message}", RuntimeWarning, stacklevel=1)
        self._errors[message] = self._errors.get(message, 0) + 1

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                kind, payload = item
                if kind == "meta":
                    self._write_meta(payload)
                else:
                    try:
                        for table, data in payload.tables().items():
                            self._write_part(table, data)
                    except Exception:
                        steps = getattr(payload, "steps", None)
                        if steps:
                            self._lost.append((min(steps), max(steps)))
                        raise
            except Exception as exc:  # keep writing later parts; reported at wait()/finish()/close()
                self._note_error(f"{type(exc).__name__}: {exc}")
            finally:
                self._queue.task_done()

    def _write_meta(self, meta: dict[str, Any]) -> None:
        """meta.json with ``parts``: how many parts of each table are complete. A flush writes a
        part per table, one after another, so a kill between two leaves a step in some tables and
        not others; readers read only the parts meta.json counts, which are whole flushes."""
        write_json(self.path / META_FILE, {**meta, "parts": dict(self._parts)})

    def _write_part(self, table: str, data: pa.Table) -> None:
        folder = self.path / table
        folder.mkdir(exist_ok=True)
        part = folder / f"part-{self._parts[table]:06d}.parquet"
        self._parts[table] += 1
        atomic_write(part, lambda p: pq.write_table(data, p))


def _make_directory(path: Path) -> bool:
    """Create the run directory; True when this call created it (so a failed start removes it)."""
    if str(path) == "":
        raise ValueError("the run path is empty; name a directory")
    if path.exists() and not path.is_dir():
        raise RunError(f"run path {path} exists and is not a directory")
    existed = path.is_dir()
    path.mkdir(parents=True, exist_ok=True)
    return not existed


def check_replaceable(path: Path, overwrite: bool) -> bool:
    """Whether ``path`` holds a run that a writer would replace; raise where a writer would refuse:
    a run without ``overwrite`` (FileExistsError), or what is not a gradscope run (RunError).

    Also usable before any writer exists (the CLI checks every model's run before training one).
    """
    tables = [path / t for t in TABLES]
    if not (path / META_FILE).exists() and not any(t.exists() for t in tables):
        return False
    if not overwrite:
        raise FileExistsError(f"{path} already holds a gradscope run; pass overwrite=True to replace it, "
                              "or choose another run= path")
    if not _is_run(path):
        raise RunError(f"refusing to overwrite {path}: it has no gradscope meta.json, so it may hold files "
                       "that are not a run's; remove them yourself or choose another run= path")
    return True


def _prepare_directory(path: Path, overwrite: bool) -> None:
    """Refuse to mix two runs' data; with ``overwrite``, remove only what a gradscope run wrote.

    Called with the lock held, so no other writer is using the files removed here.
    """
    if not check_replaceable(path, overwrite):
        return
    for folder in (path / t for t in TABLES):
        if folder.is_dir():
            for part in [*folder.glob("part-*.parquet"), *folder.glob(".part-*.parquet.tmp")]:
                part.unlink()
            with contextlib.suppress(OSError):
                folder.rmdir()  # left in place when it holds anything gradscope did not write
    for name in (META_FILE, f".{META_FILE}.tmp", MODEL_FILE, f".{MODEL_FILE}.tmp"):
        with contextlib.suppress(FileNotFoundError):
            (path / name).unlink()


def _is_run(path: Path) -> bool:
    """A meta.json that gradscope wrote (any schema version)."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and "schema_version" in meta and "status" in meta


class NoWriter:
    """The writer of a rank that does not write (all but global rank 0 of a multi-process job):
    its statistics reach the run through rank 0, so it keeps no file, lock or thread."""

    path: Path

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def start(self, meta: dict[str, Any]) -> None:
        pass

    def submit(self, job: Job) -> None:
        pass

    def submit_meta(self, meta: dict[str, Any]) -> None:
        pass

    def wait(self) -> None:
        pass

    def errors(self) -> list[str]:
        return []

    def finish(self, final_meta: Callable[[list[str]], dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass
