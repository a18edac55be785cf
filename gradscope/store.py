"""The run directory (DESIGN.md Run format): a background writer and a reader.

A run is JSON plus Parquet, never pickle, so it can be read by pandas, DuckDB or Spark directly
and loading it cannot execute code. Every file is written under a temporary name and renamed, so
a process killed at any moment leaves only whole parts. Writing happens on a daemon thread: the
training thread only hands over host copies whose device-to-host transfer may still be in flight
(the job waits on its CUDA event first).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from gradscope.attribution import COLUMNS as ATTRIBUTION_COLUMNS
from gradscope.stats import PHASES, HostCounts, finalize_blocks, finalize_layers, finalize_steps

SCHEMA_VERSION = 1
META_FILE = "meta.json"
TABLES = ("layers", "blocks", "scalars", "attribution")
_READERS = 4  # threads decoding Parquet parts in load_run

LAYER_COLUMNS = (
    "act_mean", "act_std", "act_rms", "act_absmax", "act_zero_frac", "act_sat_frac",
    "grad_out_norm", "grad_out_rms", "param_norm", "grad_norm", "update_ratio",
)
STEP_COLUMNS = ("loss", "accuracy", "lr", "grad_global_norm", "loss_scale", "eval_loss", "eval_accuracy")
BLOCK_COLUMNS = ("id_rel_residual", "id_cos", "id_grad_ratio", "branch_ratio", "token_cos",
                 "grad_in_norm", "grad_out_norm")
# pandas dtypes of each table as load_run returns it, also when a run has no rows yet
LAYER_SCHEMA = {"step": "int64", "phase": "object", "layer": "object",
                **{c: "float32" for c in LAYER_COLUMNS}}
STEP_SCHEMA = {"step": "int64", **{c: "float64" for c in STEP_COLUMNS}}
BLOCK_SCHEMA = {"step": "int64", "block": "object", **{c: "float32" for c in BLOCK_COLUMNS}}
ATTRIBUTION_SCHEMA = {"step": "int64", "block": "object", "method": "object",
                      **{c: "float32" for c in ATTRIBUTION_COLUMNS}}


class RunError(Exception):
    """A run directory that cannot be read or written; the message names the file."""


class RunNotFoundError(RunError, FileNotFoundError):
    """No run at the given path."""


# --------------------------------------------------------------------------------------------
# Writing


@dataclass
class FlushJob:
    """Host copies of a flushed slice of the recorder's buffers, turned into Parquet parts."""

    steps: list[int]  # step number of each slot
    layer_buf: torch.Tensor  # [slots, phases, layers, stats] on the host (maybe still filling)
    step_buf: torch.Tensor  # [slots, step stats]
    block_buf: torch.Tensor  # [slots, blocks, block stats]
    counts: HostCounts
    layer_names: list[str]
    block_names: list[str]
    bounded: np.ndarray  # [layers] bool: bounded activation (saturation is defined)
    zero_counted: np.ndarray | None = None  # [layers] bool: zero fraction measured
    ready: Any = None  # torch.cuda.Event to wait on before reading the host copies

    def tables(self) -> dict[str, pa.Table]:
        if self.ready is not None:
            self.ready.synchronize()
        layer_buf, step_buf = self.layer_buf.numpy(), self.step_buf.numpy()
        steps = np.asarray(self.steps, dtype=np.int64)
        out: dict[str, pa.Table] = {}

        rows = finalize_layers(layer_buf, step_buf, self.counts, self.bounded, self.zero_counted)
        if len(rows["slot"]):
            names = pa.array(self.layer_names, pa.string())
            cols: dict[str, Any] = {
                "step": pa.array(steps[rows["slot"]]),
                "phase": pa.DictionaryArray.from_arrays(
                    pa.array(rows["phase"].astype(np.int32)), pa.array(PHASES, pa.string())),
                "layer": pa.DictionaryArray.from_arrays(pa.array(rows["row"].astype(np.int32)), names),
            }
            cols.update({c: pa.array(rows[c].astype(np.float32)) for c in LAYER_COLUMNS})
            out["layers"] = pa.table(cols)

        blocks = finalize_blocks(self.block_buf.numpy(), step_buf, self.counts)
        if len(blocks["slot"]):
            cols = {"step": pa.array(steps[blocks["slot"]]),
                    "block": pa.DictionaryArray.from_arrays(pa.array(blocks["row"].astype(np.int32)),
                                                            pa.array(self.block_names, pa.string()))}
            cols.update({c: pa.array(blocks[c].astype(np.float32)) for c in BLOCK_COLUMNS})
            out["blocks"] = pa.table(cols)

        scalars = finalize_steps(step_buf, self.counts)
        if len(scalars["slot"]):
            cols = {"step": pa.array(steps[scalars["slot"]])}
            cols.update({c: pa.array(scalars[c].astype(np.float64)) for c in STEP_COLUMNS})
            out["scalars"] = pa.table(cols)
        return out


@dataclass
class AttributionJob:
    """Host copies of attribution checkpoints ``[blocks, columns]``, one per step."""

    steps: list[int]
    values: list[torch.Tensor]
    block_names: list[str]
    method: str
    ready: Any = None

    def tables(self) -> dict[str, pa.Table]:
        if self.ready is not None:
            self.ready.synchronize()
        if not self.steps:
            return {}
        n = len(self.block_names)
        values = np.concatenate([v.numpy() for v in self.values]).astype(np.float32)
        cols: dict[str, Any] = {
            "step": pa.array(np.repeat(np.asarray(self.steps, np.int64), n)),
            "block": pa.DictionaryArray.from_arrays(pa.array(np.tile(np.arange(n, dtype=np.int32), len(self.steps))),
                                                    pa.array(self.block_names, pa.string())),
            "method": pa.array([self.method] * (n * len(self.steps)), pa.string()),
        }
        cols.update({c: pa.array(values[:, i]) for i, c in enumerate(ATTRIBUTION_COLUMNS)})
        return {"attribution": pa.table(cols)}


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    _atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, allow_nan=False)))


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

    def submit(self, job: FlushJob) -> None:
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
        _atomic_write(part, lambda p: pq.write_table(data, p))


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


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class Run:
    """A recorded run: ``meta`` as written, and its tables as pandas DataFrames."""

    path: Path
    meta: dict[str, Any]
    layers: pd.DataFrame
    blocks: pd.DataFrame
    scalars: pd.DataFrame
    layer_table: pd.DataFrame = field(repr=False)
    block_table: pd.DataFrame = field(repr=False)
    attribution: pd.DataFrame = field(default_factory=lambda: _empty(ATTRIBUTION_SCHEMA), repr=False)

    @property
    def name(self) -> str:
        return str(self.meta.get("run", self.path.name))

    @property
    def status(self) -> str:
        return str(self.meta.get("status", "unknown"))


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not path.is_dir():
        raise RunNotFoundError(f"no gradscope run at {path}: directory not found")
    if not meta_path.is_file():
        raise RunNotFoundError(f"no gradscope run at {path}: {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"{meta_path} is damaged: {exc}") from None
    if not isinstance(meta, dict):
        raise RunError(f"{meta_path} is damaged: expected a JSON object")
    version = meta.get("schema_version")
    if version == SCHEMA_VERSION:
        model = meta.get("model")
        if isinstance(model, dict) and not isinstance(model.get("parameters", 0), int):
            raise RunError(f"{meta_path} is damaged: model.parameters should be an integer")
        for key, kind in (("model", dict), ("task", dict), ("schedule", dict), ("env", dict),
                          ("layers", list), ("blocks", list), ("status", str)):
            if key in meta and not isinstance(meta[key], kind) and not (key == "task" and meta[key] is None):
                raise RunError(f"{meta_path} is damaged: '{key}' should be a JSON {kind.__name__}")
        if not all(isinstance(row, dict) for row in meta.get("layers", []) + meta.get("blocks", [])):
            raise RunError(f"{meta_path} is damaged: layer and block tables should hold objects")
    if version != SCHEMA_VERSION:
        raise RunError(
            f"{meta_path} has schema_version {version!r}; this gradscope reads version "
            f"{SCHEMA_VERSION} (was the run written by another gradscope release?)")
    return meta


def _read_table(folder: Path, pool: ThreadPoolExecutor) -> pa.Table | None:
    """All parts of one table as one Arrow table (None when there are none)."""
    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if not parts:
        return None
    tables = list(pool.map(_read_part, parts))
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as exc:
        raise RunError(f"parts in {folder} do not share a schema: {exc}") from None


def _read_part(part: Path) -> pa.Table:
    # ParquetFile.read skips the dataset discovery that pq.read_table does for each file (3x
    # faster on a run's many small parts); the pool reads several parts at once instead
    try:
        with pq.ParquetFile(part) as parquet:
            return parquet.read(use_threads=False)
    except (OSError, pa.ArrowException) as exc:
        raise RunError(f"{part} is damaged or truncated: {exc}") from None


def _frame(table: pa.Table | None, schema: dict[str, str]) -> pd.DataFrame:
    """``table`` as pandas, with the columns of ``schema`` that it lacks (added since the run was
    written) read as missing; an empty frame with those columns and dtypes for no table."""
    if table is None:
        return _empty(schema)
    frame = table.to_pandas()
    for column, dtype in schema.items():
        if column not in frame:
            frame[column] = pd.Series(np.nan if dtype.startswith("float") else None, index=frame.index, dtype=dtype)
    return frame


def _empty(schema: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in schema.items()})


def _join_names(table: pa.Table | None, schema: dict[str, str], names: pd.DataFrame, key: str,
                order: list[str], extra: list[str] | None = None) -> pd.DataFrame:
    """Rows keyed by name, as pandas with type and depth joined from the meta.json table, sorted
    in network order.

    The join and the sort run in Arrow: a run of 10,000 steps has millions of rows, and doing
    the same in pandas (names turned into Python strings, a merge, a sort) takes several times
    as long.
    """
    info = names.rename(columns={"name": key})[[key, "type", *(extra or []), "depth", "rel_depth"]]
    info = info.astype({key: str, "depth": "float64", "rel_depth": "float64"})
    if table is None:
        frame = _empty(schema)
        for column in (key, "phase"):
            if column in frame:
                frame[column] = frame[column].astype(str)
        return frame.merge(info.iloc[:0], on=key, how="left")
    for column in (key, "phase"):  # strings, not pandas categoricals
        if column in table.column_names and pa.types.is_dictionary(table.schema.field(column).type):
            table = table.set_column(table.schema.get_field_index(column), column,
                                     table[column].cast(pa.string()))
    where = pc.index_in(table[key], value_set=pa.array(info[key], pa.string()))
    for column in info.columns[1:]:
        table = table.append_column(column, pc.take(pa.array(info[column], from_pandas=True), where))
    # a stable sort; nulls (a name missing from meta.json) go last, as in pandas. Parts are
    # written in step and row order, so often nothing moves and the copy is skipped.
    indices = pc.sort_indices(table, sort_keys=[(c, "ascending") for c in order])
    if not np.array_equal(indices.to_numpy(), np.arange(len(indices))):
        table = table.take(indices)
    return _frame(table, schema)


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a run directory written by ``gradscope.watch``.

    Raises:
        RunNotFoundError: nothing at ``path`` or no ``meta.json`` in it.
        RunError: a damaged file or an unknown schema version; the message names the file.
    """
    path = Path(path)
    meta = read_meta(path)
    layer_table = pd.DataFrame(meta.get("layers", []),
                               columns=["name", "type", "params", "row", "depth", "rel_depth", "calls"])
    block_table = pd.DataFrame(meta.get("blocks", []), columns=[
        "name", "type", "row", "source", "branch", "residual", "depth", "rel_depth", "calls", "reason"])
    with ThreadPoolExecutor(max_workers=_READERS) as pool:  # parts decode in parallel, off the GIL
        tables = {name: _read_table(path / name, pool) for name in TABLES}
    try:
        layers = _join_names(tables["layers"], LAYER_SCHEMA, layer_table, "layer", ["step", "phase", "depth"])
        blocks = _join_names(tables["blocks"], BLOCK_SCHEMA, block_table, "block", ["step", "depth"],
                             extra=["residual"])
        attribution = _join_names(tables["attribution"], ATTRIBUTION_SCHEMA, block_table, "block",
                                  ["step", "depth"], extra=["residual"])
    except (ValueError, TypeError, KeyError, pa.ArrowException) as exc:
        raise RunError(f"{path / META_FILE} is damaged: its layer or block table does not fit the data ({exc})") from None
    scalars = _frame(tables["scalars"], STEP_SCHEMA).sort_values("step", kind="stable", ignore_index=True)
    return Run(path=path, meta=meta, layers=layers, blocks=blocks, scalars=scalars,
               layer_table=layer_table, block_table=block_table, attribution=attribution)
