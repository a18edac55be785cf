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
    """Host copies of a flushed slice of the recorder's buffers, turned into Parquet parts."""

    steps: list[int]  # step number of each slot
    layer_buf: torch.Tensor  # [slots, phases, layers, LAYER.width] on the host (maybe still filling)
    step_buf: torch.Tensor  # [slots, STEP.width]
    block_buf: torch.Tensor  # [slots, blocks, BLOCK.width]
    counts: HostCounts
    layer_names: list[str]
    block_names: list[str]
    bounded: np.ndarray  # [layers] bool: bounded activation (saturation is defined)
    zero_counted: np.ndarray | None = None  # [layers] bool: zero fraction measured
    ready: Any = None  # torch.cuda.Event to wait on before reading the host copies

    def tables(self) -> dict[str, pa.Table]:
        if self.ready is not None:
            self.ready.synchronize()
        step_buf = self.step_buf.numpy()
        steps = np.asarray(self.steps, dtype=np.int64)
        zero_counted = self.zero_counted if self.zero_counted is not None else np.ones(len(self.layer_names), bool)
        facts = {"bounded": self.bounded, "zero_counted": zero_counted}
        out: dict[str, pa.Table] = {}
        rows = schema.finalize("layers", self.layer_buf.numpy(), step_buf, self.counts, facts)
        if len(rows["slot"]):
            phases = pa.DictionaryArray.from_arrays(pa.array(rows["phase"].astype(np.int32)),
                                                    pa.array(PHASES, pa.string()))
            out["layers"] = pa.table({"step": pa.array(steps[rows["slot"]]), "phase": phases,
                                      "layer": _names(rows["row"], self.layer_names),
                                      **_statistics("layers", rows)})
        blocks = schema.finalize("blocks", self.block_buf.numpy(), step_buf, self.counts)
        if len(blocks["slot"]):
            out["blocks"] = pa.table({"step": pa.array(steps[blocks["slot"]]),
                                      "block": _names(blocks["row"], self.block_names),
                                      **_statistics("blocks", blocks)})
        scalars = schema.finalize("scalars", step_buf, step_buf, self.counts)
        if len(scalars["slot"]):
            out["scalars"] = pa.table({"step": pa.array(steps[scalars["slot"]]), **_statistics("scalars", scalars)})
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
            "block": _names(np.tile(np.arange(n), len(self.steps)), self.block_names),
            "method": pa.array([self.method] * (n * len(self.steps)), pa.string()),
        }
        cols.update({c.name: pa.array(values[:, i]) for i, c in enumerate(schema.columns("attribution"))})
        return {"attribution": pa.table(cols)}
