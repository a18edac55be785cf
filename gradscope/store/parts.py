"""What one flush writes: host copies of the statistics buffers turned into Arrow tables.

The recorder hands a job to the writer thread with device-to-host copies that may still be in
flight; ``tables()`` waits for them, then finalises every table by the schema
(``schema.finalize``), off the training thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from gradscope.store import schema
from gradscope.store.schema import PHASES, HostCounts


def _names(codes: np.ndarray, names: list[str]) -> pa.DictionaryArray:
    """Row numbers as a dictionary-encoded string column (one string per name, not per row)."""
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(names, pa.string()))


def _statistics(table: str, values: dict[str, np.ndarray]) -> dict[str, pa.Array]:
    return {c.name: pa.array(values[c.name].astype(c.dtype)) for c in schema.columns(table)}


@dataclass
class FlushJob:
    """Host copies of a flushed slice of the recorder's buffers, turned into Parquet parts.

    ``by_rank`` (``watch(per_rank=True)`` on rank 0) adds each rank's own statistics of the steps
    ``by_rank_steps`` as the ``*_by_rank`` tables, with a ``rank`` column.
    """

    steps: list[int]  # step number of each slot
    layer_buf: Any  # [slots, phases, layers, LAYER.width] on the host (torch, maybe still filling; or numpy)
    step_buf: Any  # [slots, STEP.width]
    block_buf: Any  # [slots, blocks, BLOCK.width]
    counts: HostCounts
    layer_names: list[str]
    block_names: list[str]
    bounded: np.ndarray  # [layers] bool: bounded activation (saturation is defined)
    zero_counted: np.ndarray | None = None  # [layers] bool: zero fraction measured
    ready: Any = None  # torch.cuda.Event to wait on before reading the host copies
    by_rank: list[tuple[Any, Any, Any, HostCounts]] | None = None  # (layer_buf, step_buf, block_buf, counts)
    by_rank_steps: list[int] | None = None

    def tables(self) -> dict[str, pa.Table]:
        if self.ready is not None:
            self.ready.synchronize()
        out = self._tables(self.steps, self.layer_buf, self.step_buf, self.block_buf, self.counts)
        for rank, (layer, step, block, counts) in enumerate(self.by_rank or []):
            for table, rows in self._tables(self.by_rank_steps or [], layer, step, block, counts).items():
                rows = rows.add_column(1, "rank", pa.array(np.full(len(rows), rank, np.int64)))
                name = f"{table}_by_rank"
                out[name] = pa.concat_tables([out[name], rows]) if name in out else rows
        return out

    def _tables(self, steps_list: list[int], layer: Any, step: Any, block: Any, counts: HostCounts,
                ) -> dict[str, pa.Table]:
        step_buf = _numpy(step)
        steps = np.asarray(steps_list, dtype=np.int64)
        zero_counted = self.zero_counted if self.zero_counted is not None else np.ones(len(self.layer_names), bool)
        facts = {"bounded": self.bounded, "zero_counted": zero_counted}
        out: dict[str, pa.Table] = {}
        rows = schema.finalize("layers", _numpy(layer), step_buf, counts, facts)
        if len(rows["slot"]):
            phases = pa.DictionaryArray.from_arrays(pa.array(rows["phase"].astype(np.int32)),
                                                    pa.array(PHASES, pa.string()))
            out["layers"] = pa.table({"step": pa.array(steps[rows["slot"]]), "phase": phases,
                                      "layer": _names(rows["row"], self.layer_names),
                                      **_statistics("layers", rows)})
        blocks = schema.finalize("blocks", _numpy(block), step_buf, counts)
        if len(blocks["slot"]):
            out["blocks"] = pa.table({"step": pa.array(steps[blocks["slot"]]),
                                      "block": _names(blocks["row"], self.block_names),
                                      **_statistics("blocks", blocks)})
        scalars = schema.finalize("scalars", step_buf, step_buf, counts)
        if len(scalars["slot"]):
            out["scalars"] = pa.table({"step": pa.array(steps[scalars["slot"]]), **_statistics("scalars", scalars)})
        return out


def _numpy(buf: Any) -> np.ndarray:
    return buf.numpy() if isinstance(buf, torch.Tensor) else np.asarray(buf)


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
            "block": _names(np.tile(np.arange(n), len(self.steps)), self.block_names),
            "method": pa.array([self.method] * (n * len(self.steps)), pa.string()),
        }
        cols.update({c.name: pa.array(values[:, i]) for i, c in enumerate(schema.columns("attribution"))})
        return {"attribution": pa.table(cols)}


@dataclass
class TableJob:
    """An analysis's rows (``gradscope.analyses``) for a run a recorder is writing."""

    table: str
    data: pa.Table

    def tables(self) -> dict[str, pa.Table]:
        return {self.table: self.data}
