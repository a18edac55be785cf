"""Shared helpers: seeded training loops run with and without a recorder."""

from __future__ import annotations

import os
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.recording import kernels

# GRADSCOPE_TEST_BATCHING=torch (or =triton, with TRITON_INTERPRET=1) runs the whole suite with
# the GPU's batched reductions forced on, on any device.
kernels.MODE = os.environ.get("GRADSCOPE_TEST_BATCHING") or None


def batches(model_kind: str, steps: int, seed: int = 0, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3, 8, 8) if model_kind == "cnn" else (batch, 8)
    return [(torch.randn(shape, generator=g), torch.randint(0, 4, (batch,), generator=g)) for _ in range(steps)]


def train(
    model: nn.Module,
    data: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    run: Any = None,
    lr: float = 0.05,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    call_step: bool = True,
    **watch_kwargs: Any,
) -> gradscope.Recorder | None:
    """Train ``model`` on ``data``; record it into ``run`` when given."""
    opt = optimizer_cls(model.parameters(), lr=lr)
    rec = gradscope.watch(model, run, optimizer=opt, **watch_kwargs) if run is not None else None
    try:
        for x, y in data:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            if rec is not None and call_step:
                rec.step(loss=loss)
            opt.step()
    finally:
        if rec is not None:
            rec.close()
    return rec


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture(scope="session")
def init_runs_56(tmp_path_factory):
    """plain56 and resnet56 recorded for one step at initialisation (batch 64, 32x32, seed 0),
    shared by the tests that compare them."""
    from gradscope import models

    out = tmp_path_factory.mktemp("init56")
    for name in ("plain56", "resnet56"):
        torch.manual_seed(0)
        model = models.create(name)
        x, y = models.example_input(name, batch=64)
        with gradscope.watch(model, out / name) as rec:
            F.cross_entropy(model(x), y).backward()
            rec.step()
    return {name: out / name for name in ("plain56", "resnet56")}
