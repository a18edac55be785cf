"""``watch()``'s arguments, checked before anything is created: a bad one leaves no file behind."""

from __future__ import annotations

import datetime as _dt
import itertools
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradscope.recording.attribution import Attribution
from gradscope.recording.nonfinite import checked_action


def model_device(model: nn.Module) -> torch.device:
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def checked_device(device: torch.device | str | None, model: nn.Module) -> torch.device:
    """Where statistics live: a real device (the meta device holds no numbers to record)."""
    try:
        chosen = torch.device(device) if device is not None else model_device(model)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"gradscope.watch: device={device!r} is not a device: {exc}") from None
    if chosen.type == "meta":
        where = f"device={device!r}" if device is not None else "the model's parameters are on the meta device, so"
        raise ValueError(f"gradscope.watch: {where} holds no values to record; materialise the model "
                         "(e.g. model.to_empty(device=...) and load its weights) or pass a real device=")
    return chosen


def checked_meta(meta: dict[str, Any] | None) -> dict[str, Any]:
    """``meta=`` as meta.json will hold it, refused before any file is made if JSON cannot hold it."""
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise TypeError(f"gradscope.watch: meta= must be a dict, got {type(meta).__name__}")
    reserved = sorted(set(meta) & OWN_META_KEYS)
    if reserved:
        raise ValueError(f"gradscope.watch: meta= may not set {', '.join(map(repr, reserved))}: gradscope "
                         "writes those itself (put your facts under other keys)")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"gradscope.watch: meta= must be JSON-serialisable with finite numbers: {exc}") from None
    except RecursionError:
        raise ValueError("gradscope.watch: meta= is nested too deeply (or holds itself)") from None
    return dict(meta)


#: meta.json keys gradscope writes; ``meta=`` may add others, and fill ``task`` (None otherwise).
OWN_META_KEYS = frozenset({"schema_version", "gradscope_version", "run", "status", "started_at", "updated_at",
                            "model", "layers", "blocks", "attribution", "optimizer", "gradients", "nonfinite",
                            "noise_scale", "schedule", "errors", "env", "parts"})


def default_run_path(model: nn.Module) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{type(model).__name__.lower()}-{stamp}"


def check_args(model: Any, run: Any, every: Any, flush_every: Any, attribution: Any, on_nonfinite: Any) -> None:
    """watch()'s plain arguments, checked before anything is attached to the model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"gradscope.watch expects an nn.Module, got {type(model).__name__}")
    for name, value in (("every", every), ("flush_every", flush_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"gradscope.watch: {name} must be a positive integer, got {value!r}")
    if attribution is not None and not isinstance(attribution, Attribution):
        raise TypeError("gradscope.watch: attribution must be a gradscope.Attribution, "
                        f"got {type(attribution).__name__}")
    checked_action(on_nonfinite)
    if run is not None and str(run) == "":
        raise ValueError("gradscope.watch: run= is empty; name a directory (or leave it out: runs/<model>-<time>)")


def refuse_if_watched(model: nn.Module, open_recorders: Any) -> None:
    """One recorder per module: two would measure each other's hooks."""
    mine = {id(m) for m in model.modules()}
    for rec in list(open_recorders):
        if not rec._closed and mine & {id(m) for m in rec.model.modules()}:
            raise RuntimeError(
                f"gradscope.watch: {type(model).__name__} (or a module inside it) is already watched "
                f"by {rec!r}; close that recorder first")
