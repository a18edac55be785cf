"""What a recorder writes into ``meta.json``: the model, its layers and blocks, the schedule, the
environment. Built from the recorder's state at each flush and at close, so a reader always
finds the run described as far as it got (``store.meta`` holds the format)."""

from __future__ import annotations

import platform
from typing import Any

import torch

from gradscope.recording.processes import user_class
from gradscope.store.meta import SCHEMA_VERSION, describe_optimizer, now
from gradscope.version import __version__


def run_meta(rec: Any, status: str, errors: list[str] | None = None) -> dict[str, Any]:
    """``meta.json`` of the ``Recorder`` ``rec``'s run with ``status``; depths and call counts as measured so far."""
    rec._layer_order.assign_depths(rec.layers)
    rec._block_order.assign_depths(rec.blocks)
    for layer in rec.layers:
        layer.calls = int(rec._calls[layer.row])
    for block in rec.blocks:
        block.calls = int(rec._block_calls[block.row])
    model = rec.model
    depth = getattr(model, "depth", None)
    return {
        "schema_version": SCHEMA_VERSION,
        "gradscope_version": __version__,
        "run": rec.path.name,
        "status": status,
        "started_at": rec._started_at,
        "updated_at": now(),
        "model": {"class": user_class(model).__name__,
                  "depth": depth if isinstance(depth, int) else None,
                  "registry_name": getattr(model, "gradscope_name", None),
                  "config": getattr(model, "gradscope_config", None),
                  "parameters": sum(map(rec._ownership.numel, rec._ownership.parameters(model)))},
        "layers": [layer.to_json() for layer in rec.layers],
        "blocks": [block.to_json() for block in rec.blocks],
        "attribution": rec._attribution.config.describe() if rec._attribution else None,
        "task": None,
        "optimizer": describe_optimizer(rec.optimizer, rec._optimizer_wrappers),
        "gradients": rec._gradient_stage,
        "nonfinite": [event.to_json() for event in rec._nonfinite.found] or None,
        "noise_scale": rec._micro is not None,
        "schedule": {"every": rec.every, "flush_every": rec.flush_every,
                     "last_step": rec._clock.step, "dropped_step": rec._dropped_step},
        "errors": errors or [],
        "env": {"torch": torch.__version__, "python": platform.python_version(),
                "device": str(rec.device), "world_size": rec.processes.world_size,
                "processes": {**rec.processes.describe(), "per_rank": rec.per_rank}
                if rec.processes.several else None,
                "amp_scaler": rec.scaler is not None,
                # gradscope's probes ran inside a compiled graph: Inductor may round the model's own
                # arithmetic otherwise than eager, so compare such figures within tolerance
                "compiled": bool(rec._staging.used)},
        **rec._extra_meta,
    }
