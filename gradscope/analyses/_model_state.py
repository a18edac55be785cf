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


@contextlib.contextmanager
def untouched(model: nn.Module, *, train: bool) -> Iterator[None]:
    """Inside: ``model`` in train (``train=True``, dropout off) or eval mode, autograd on, autocast off; after:
    its modes, buffers and the random state as they were, and its recorder recording again."""
    modes = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({b.device.index or 0 for b in [*model.parameters(), *model.buffers()] if b.is_cuda})
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    recorder = recorder_of(model)
    paused = recorder.paused() if recorder is not None else contextlib.nullcontext()
    try:
        model.train(train)
        for m in model.modules():  # dropout is noise, not the function: off in either mode
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
        with paused, torch.random.fork_rng(devices=devices), torch.enable_grad(), \
                torch.autocast(device_type if device_type in ("cuda", "cpu") else "cpu", enabled=False):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        for m, training in modes:
            m.training = training
