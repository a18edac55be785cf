"""meta.json: what a run is (model, layer and block tables, schedule, status), written atomically.

Every file of a run is written under a temporary name and renamed, so a process killed at any
moment leaves only whole files. Unknown schema versions and damaged files are refused with a
message that names the file.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
META_FILE = "meta.json"
#: The trained model's weights, which ``gradscope run`` keeps for the analyses (safetensors: no pickle)
MODEL_FILE = "model.safetensors"
#: The ``type`` in the layer table of a row of parameters that no watched module owns (norms only).
PARAMETER_TYPE = "Parameter"


class RunError(Exception):
    """A run directory that cannot be read or written; the message names the file."""


class RunNotFoundError(RunError, FileNotFoundError):
    """No run at the given path."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` and a rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk must not leave a half-written temporary behind
            tmp.unlink()
        raise


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, allow_nan=False)))


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not path.is_dir():
        raise RunNotFoundError(f"no gradscope run at {path}: directory not found")
    if not meta_path.is_file():
        raise RunNotFoundError(f"no gradscope run at {path}: {meta_path} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except RecursionError:  # '[' nested deeper than the parser's recursion limit
        raise RunError(f"{meta_path} is damaged: nested too deeply to be a gradscope meta.json") from None
    except (OSError, ValueError) as exc:  # ValueError: bad JSON, bad UTF-8, an integer of over 4300 digits
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


def now() -> str:
    """The time, as meta.json's ``started_at`` and ``updated_at`` write it."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def describe_optimizer(optimizer: Any, wrappers: list[str] | None = None) -> dict[str, Any] | None:
    """The optimizer's class and JSON-safe defaults, for meta.json (and the wrappers around it)."""
    if optimizer is None:
        return None
    defaults = {k: v for k, v in optimizer.defaults.items() if _json_safe(v)}
    return {"class": type(optimizer).__name__, "defaults": defaults,
            "param_groups": len(optimizer.param_groups), "wrapped_by": list(wrappers or [])}


def _json_safe(value: Any) -> bool:
    if isinstance(value, (bool, int, str)) or value is None:
        return True
    if isinstance(value, float):
        return bool(np.isfinite(value))
    if isinstance(value, (list, tuple)):
        return all(_json_safe(v) for v in value)
    return False
