"""``watch()``: the public entry point, with every argument documented once.

Kept apart from ``Recorder`` (which it returns) so the recorder's module holds only how a run
is recorded, and the user-facing signature reads on its own.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from gradscope.recording import termination
from gradscope.recording.attribution import Attribution
from gradscope.recording.layers import ModuleFilter
from gradscope.recording.recorder import Recorder


def watch(
    model: nn.Module,
    run: str | os.PathLike[str] | None = None,
    *,
    every: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    modules: ModuleFilter | None = None,
    blocks: ModuleFilter | None = None,
    flush_every: int = 50,
    overwrite: bool = False,
    device: torch.device | str | None = None,
    meta: dict[str, Any] | None = None,
    attribution: Attribution | None = None,
    per_rank: bool = False,
    on_nonfinite: str = "warn",
    noise_scale: bool = False,
) -> Recorder:
    """Start recording ``model``'s gradient flow into the run directory ``run``.

    Args:
        model: any ``nn.Module``; its forward, backward and the optimizer are left untouched.
        run: directory to write (default ``runs/<ModelClass>-<timestamp>``).
        every: record steps 0, every, 2*every, ...; other steps cost one Python test per hook.
        optimizer: mark a step at each ``optimizer.step()`` and read learning rates from it
            (a framework's wrapper too: accelerate's, Lightning's; its inner optimizer is hooked).
            Without it, call ``rec.step()`` after each ``backward()``.
        scaler: a ``torch.amp.GradScaler`` in use; gradient statistics are unscaled.
        modules: which modules to watch: glob(s) on qualified names, module types, or a
            predicate ``(name, module) -> bool``. Default: every leaf module owning parameters.
        blocks: which modules to compare with the identity (same forms as ``modules``).
            Default: the blocks a reference model declares, else repeated sibling modules
            in ``nn.Sequential``/``nn.ModuleList`` containers; ``[]`` for none.
        flush_every: recorded steps written to disk at a time (the device holds one more).
        overwrite: replace an existing gradscope run at ``run`` instead of refusing (never a
            directory without a gradscope meta.json, nor a run another writer holds).
        device: where statistics live (default: the device of the model's first parameter).
        meta: extra JSON-serialisable facts for ``meta.json`` (e.g. ``{"task": {...}}``).
        attribution: an ``Attribution`` to compute Captum attribution flow over the watched
            blocks on a probe batch at checkpoints (see ``gradscope.recording.attribution``).
        per_rank: in a multi-process job, also write each rank's own statistics (the
            ``*_by_rank`` tables, with a ``rank`` column) beside the merged ones.
        on_nonfinite: at the flush that first holds a NaN or inf in a watched layer's output or
            output gradient: ``"warn"`` naming the step, pass, layer and statistic (also kept in
            meta.json's ``nonfinite``), ``"raise"`` (``FloatingPointError``; with several processes,
            rank 0 checks the merged data and warns: one rank raising would strand the others) or
            ``"ignore"``.
        noise_scale: also take each backward pass's own gradient norm (micro-batches under
            gradient accumulation, each rank's under DDP) for the gradient noise scale
            (``gradscope.analyses.noise_scale``): a hook per parameter, on recorded steps.

    Under ``torchrun`` call it on every rank alike (DDP, FSDP2/HSDP, FSDP1 models): rank 0 writes
    the run, merged over the ranks at each flush, so call ``flush()``/``close()`` on every rank.

    Returns:
        The ``Recorder``; use it as a context manager or call ``close()``.
    """
    return Recorder(model, run, every=every, optimizer=optimizer, scaler=scaler, modules=modules,
                    blocks=blocks, flush_every=flush_every, overwrite=overwrite, device=device, meta=meta,
                    attribution=attribution, per_rank=per_rank,
                    on_nonfinite=on_nonfinite, noise_scale=noise_scale)


def recorder_of(model: nn.Module) -> Recorder | None:
    """The open recorder watching ``model`` or a module inside it (an analysis pauses it)."""
    mine = {id(m) for m in model.modules()}
    for rec in list(termination.OPEN):
        if not rec.closed and mine & {id(m) for m in rec.model.modules()}:
            return rec
    return None
