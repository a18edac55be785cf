"""The run directory's reader: ``load_run`` gives a run's tables as pandas DataFrames.

Parts are decoded in a thread pool; layer and block names from meta.json are joined in and rows
sorted in network order in Arrow, because a run of 10,000 steps has millions of rows.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gradscope.store.lock import writer_alive
from gradscope.store.meta import META_FILE, RunError, read_meta
from gradscope.store.schema import ANALYSES, KEYS, TABLES, frame_dtypes

_READERS = 4  # threads decoding Parquet parts in load_run

# pandas dtypes of each table as load_run returns it, also when a run has no rows yet
LAYER_SCHEMA = frame_dtypes("layers")
STEP_SCHEMA = frame_dtypes("scalars")
BLOCK_SCHEMA = frame_dtypes("blocks")
ATTRIBUTION_SCHEMA = frame_dtypes("attribution")
SCHEMAS = {name: frame_dtypes(name) for name in TABLES}


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
    #: each rank's own statistics, with a ``rank`` column (``watch(per_rank=True)``; else empty)
    layers_by_rank: pd.DataFrame = field(default_factory=lambda: _empty(SCHEMAS["layers_by_rank"]), repr=False)
    blocks_by_rank: pd.DataFrame = field(default_factory=lambda: _empty(SCHEMAS["blocks_by_rank"]), repr=False)
    scalars_by_rank: pd.DataFrame = field(default_factory=lambda: _empty(SCHEMAS["scalars_by_rank"]), repr=False)
    #: what ``gradscope.analyses`` stored (empty where an analysis was not run)
    shattering: pd.DataFrame = field(default_factory=lambda: _empty(SCHEMAS["shattering"]), repr=False)
    lesion: pd.DataFrame = field(default_factory=lambda: _empty(SCHEMAS["lesion"]), repr=False)
    noise_scale: pd.DataFrame = field(default_factory=lambda: _empty(SCHEMAS["noise_scale"]), repr=False)

    @property
    def name(self) -> str:
        return str(self.meta.get("run", self.path.name))

    def _repr_html_(self) -> str:
        """Jupyter's view: findings, the summary table and gradient flow by depth, as in the report."""
        from gradscope.reports.notebook import runs_html  # presentation: loaded only when displayed

        return runs_html([self])

    @property
    def status(self) -> str:
        """meta.json's status, except that ``running`` with no process holding the run's lock
        reads ``interrupted``: its writer was killed (or its disk filled) before it could say so."""
        status = str(self.meta.get("status", "unknown"))
        if status == "running" and not writer_alive(self.path):
            return "interrupted"
        return status


def _read_table(folder: Path, pool: ThreadPoolExecutor, committed: int | None = None) -> pa.Table | None:
    """The parts of one table that meta.json counts as complete (all of them for runs written
    before it counted) as one Arrow table (None when there are none)."""
    parts = sorted(folder.glob("part-*.parquet")) if folder.is_dir() else []
    if committed is not None:  # later parts belong to a flush a kill cut short
        parts = [p for p in parts if _part_number(p) < committed]
    if not parts:
        return None
    for part in parts:
        if not part.is_file():  # a FIFO or a device would block the reader, or never end
            raise RunError(f"{part} is not a regular file")
    tables = list(pool.map(_read_part, parts, [folder.name] * len(parts)))
    try:
        return pa.concat_tables(tables, promote_options="default")
    except pa.ArrowException as exc:
        raise RunError(_mismatch(parts, tables, exc)) from None


def _read_part(part: Path, table_name: str) -> pa.Table:
    # ParquetFile.read skips the dataset discovery that pq.read_table does for each file (3x
    # faster on a run's many small parts); the pool reads several parts at once instead
    try:
        with pq.ParquetFile(part) as parquet:
            table = parquet.read(use_threads=False)
    except (OSError, pa.ArrowException) as exc:
        raise RunError(f"{part} is damaged or truncated: {_one_line(exc)}") from None
    return _check_part(part, table_name, table)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or (
        pa.types.is_dictionary(t) and _is_string(t.value_type))


#: Arrow type tests for the pandas dtypes of the schema (``frame_dtypes``); the rest are floats.
_KINDS = {"int64": pa.types.is_integer, "object": _is_string, "bool": pa.types.is_boolean}


def _check_part(part: Path, table_name: str, table: pa.Table) -> pa.Table:
    """``table`` as read from ``part`` if its columns are those of ``table_name``, with integer
    steps as int64; otherwise a RunError naming the part and what is wrong.

    Only the Arrow schema is read, not the data. A part of an older release that lacks a
    statistic column passes: that column reads as missing (``_frame``).
    """
    names = table.column_names
    columns = set(names)
    if len(columns) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise RunError(f"{part}: column{'s' * (len(twice) > 1)} {', '.join(map(repr, twice))} appear more than once")
    expected = SCHEMAS[table_name]
    overlap = {name: len(columns & set(dtypes)) for name, dtypes in SCHEMAS.items()}
    best = max(overlap, key=lambda name: (overlap[name], name == table_name))
    if best != table_name and overlap[best] > overlap[table_name]:
        raise RunError(f"{part}: its columns belong to table '{best}', not '{table_name}' "
                       "(a part in the wrong folder?)")
    missing = [key for key in KEYS[table_name] if key not in columns]
    if missing:
        raise RunError(f"{part}: missing key column{'s' * (len(missing) > 1)} {', '.join(map(repr, missing))}")
    for field_ in table.schema:
        dtype = expected.get(field_.name)
        if dtype is None or pa.types.is_null(field_.type):
            continue
        fits = _KINDS.get(dtype, pa.types.is_floating)
        if not fits(field_.type):
            raise RunError(f"{part}: column '{field_.name}' has type {field_.type}, expected "
                           f"{'string' if dtype == 'object' else dtype}")
    if table.schema.field("step").type != pa.int64():  # another integer type: cast (only then touches data)
        try:
            table = table.set_column(table.schema.get_field_index("step"), "step", table["step"].cast(pa.int64()))
        except pa.ArrowException as exc:
            raise RunError(f"{part}: column 'step' does not fit int64: {_one_line(exc)}") from None
    return table


def _mismatch(parts: list[Path], tables: list[pa.Table], exc: BaseException) -> str:
    """Which part's column type differs from an earlier part's (only when concatenating failed)."""
    seen: dict[str, tuple[pa.DataType, Path]] = {}
    for part, table in zip(parts, tables):
        for field_ in table.schema:
            if pa.types.is_null(field_.type):
                continue
            first = seen.setdefault(field_.name, (field_.type, part))
            if first[0] != field_.type:
                return (f"{part}: column '{field_.name}' has type {field_.type}, but {first[1].name} in the same "
                        f"folder has {first[0]}")
    return f"parts in {parts[0].parent} do not share a schema: {_one_line(exc)}"


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


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


def _analysis_frame(table: pa.Table | None, name: str) -> pd.DataFrame:
    """An analysis table: an analysis run again at a step replaces its earlier rows there (parts
    are read in the order they were written, so the last one wins)."""
    frame = _frame(table, SCHEMAS[name])
    frame = frame.drop_duplicates(subset=list(KEYS[name]), keep="last")
    return frame.sort_values(["step", "order"] if name == "lesion" else ["step"], kind="stable", ignore_index=True)


def _part_number(part: Path) -> int:
    number = part.name[len("part-"):-len(".parquet")]
    return int(number) if number.isdigit() else -1


def _committed_parts(meta: dict[str, Any], path: Path) -> dict[str, int]:
    """meta.json's count of complete parts per table ({} for runs written before it counted)."""
    parts = meta.get("parts")
    if parts is None:
        return {}
    if not isinstance(parts, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              for v in parts.values()):
        raise RunError(f"{path / META_FILE} is damaged: 'parts' should map tables to part counts")
    return parts


class Runs(list):
    """Runs read together (``load_runs``); Jupyter shows them side by side, as a report compares them."""

    def _repr_html_(self) -> str:
        from gradscope.reports.notebook import runs_html  # presentation: loaded only when displayed

        return runs_html(list(self))


def load_runs(*paths: str | os.PathLike[str]) -> Runs:
    """``load_run`` of each path, in order, as a ``Runs`` list."""
    return Runs(load_run(path) for path in paths)


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
        committed = _committed_parts(meta, path)
        tables = {name: _read_table(path / name, pool, committed.get(name)) for name in TABLES}
    try:
        layers = _join_names(tables["layers"], LAYER_SCHEMA, layer_table, "layer", ["step", "phase", "depth"])
        blocks = _join_names(tables["blocks"], BLOCK_SCHEMA, block_table, "block", ["step", "depth"],
                             extra=["residual"])
        attribution = _join_names(tables["attribution"], ATTRIBUTION_SCHEMA, block_table, "block",
                                  ["step", "depth"], extra=["residual"])
        by_rank = {"layers_by_rank": _join_names(tables["layers_by_rank"], SCHEMAS["layers_by_rank"], layer_table,
                                                 "layer", ["step", "rank", "phase", "depth"]),
                   "blocks_by_rank": _join_names(tables["blocks_by_rank"], SCHEMAS["blocks_by_rank"], block_table,
                                                 "block", ["step", "rank", "depth"], extra=["residual"])}
    except (ValueError, TypeError, KeyError, pa.ArrowException) as exc:
        raise RunError(f"{path / META_FILE} is damaged: its layer or block table does not fit the data "
                       f"({_one_line(exc)})") from None
    scalars = _frame(tables["scalars"], STEP_SCHEMA).sort_values("step", kind="stable", ignore_index=True)
    by_rank["scalars_by_rank"] = _frame(tables["scalars_by_rank"], SCHEMAS["scalars_by_rank"]).sort_values(
        ["step", "rank"], kind="stable", ignore_index=True)
    analyses = {name: _analysis_frame(tables[name], name) for name in ANALYSES}
    return Run(path=path, meta=meta, layers=layers, blocks=blocks, scalars=scalars,
               layer_table=layer_table, block_table=block_table, attribution=attribution, **by_rank, **analyses)
