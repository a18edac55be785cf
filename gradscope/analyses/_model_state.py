"""Running a user's model for an analysis without leaving a trace in its training.

An analysis runs forwards and backwards on the model itself (no copy: a copy would double the
memory and carry the recorder's hooks along). So that the training that follows is the one that
would have run without it, the analysis: pauses a recorder watching the model (its probes would
take the analysis's forwards for training steps), forks the random state (dropout draws), puts
back the buffers it changes (BatchNorm's running statistics in train mode), takes gradients with
``torch.autograd.grad`` (parameters' ``.grad`` untouched) and restores every module's mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from gradscope.recording.entry import recorder_of
from gradscope.recording.probe_state import probe_state


@contextlib.contextmanager
def untouched(model: nn.Module, *, train: bool) -> Iterator[None]:
    """Inside: ``probe_state(model, train=)`` with its recorder paused; after: its buffers as they were too."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    recorder = recorder_of(model)
    paused = recorder.paused() if recorder is not None else contextlib.nullcontext()
    try:
        with paused, probe_state(model, train=train):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
