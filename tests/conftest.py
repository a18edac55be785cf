"""Fixtures shared by the tests. The seeded training loops live in ``gradscope.testing``
(re-exported here for tests that import them from conftest)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import gradscope
from gradscope.recording import kernels
from gradscope.testing import batches, train  # noqa: F401  (re-exported)

# GRADSCOPE_TEST_BATCHING=torch (or =triton, with TRITON_INTERPRET=1) runs the whole suite with
# the GPU's batched reductions forced on, on any device.
kernels.MODE = os.environ.get("GRADSCOPE_TEST_BATCHING") or None

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest-xdist runs two workers on the suite's two cores: one intra-op thread each, so they
    # do not take turns on oversubscribed cores (processes a test starts that do not load this
    # file keep torch's default)
    torch.set_num_threads(1)


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
