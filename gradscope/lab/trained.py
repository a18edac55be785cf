"""A reference model's trained weights, kept in its run so the analyses can take it up later.

``gradscope run`` writes ``model.safetensors`` beside meta.json when training ends (safetensors:
tensors only, so loading it runs no code, unlike a pickle). meta.json names the model, its
settings, the task and the seed, so the model is rebuilt as it began (the seeded initialisation)
and, with the weights, as it ended.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from gradscope.store.meta import MODEL_FILE, RunError, atomic_write


def save_weights(model: nn.Module, run: str | os.PathLike[str]) -> Path:
    """Write ``model``'s parameters and buffers into the run (replacing earlier ones atomically)."""
    from safetensors.torch import save_model  # lazily: only where a run keeps its weights

    path = Path(run) / MODEL_FILE
    atomic_write(path, lambda p: save_model(model, str(p)))
    return path


def load_weights(model: nn.Module, run: str | os.PathLike[str]) -> None:
    """Load the weights a run kept into ``model`` (the same reference model, as ``rebuild`` makes it)."""
    weights = Path(run) / MODEL_FILE
    if not weights.is_file():
        raise RunError(f"run {run} keeps no trained weights ({MODEL_FILE}): it was recorded before "
                       "gradscope kept them, or by watch() rather than `gradscope run`; run it again")
    from safetensors.torch import load_model

    try:
        load_model(model, str(weights))
    except Exception as exc:  # a damaged file, or weights of another model
        raise RunError(f"{weights} does not fit {type(model).__name__}: {' '.join(str(exc).split())}") from None
