"""The recorder is an observer: training with it attached gives bit-identical parameters."""

from __future__ import annotations

import copy

import pytest
import torch

import gradscope
from gradscope import models
from gradscope.recording.blocks import declared_blocks
from gradscope.testing import (
    TinyCNN,
    TinyMLP,
    TwiceCalled,
    assert_same_parameters,
    batches,
    small_overrides,
    train,
    train_reference,
)

MODELS = {"mlp": TinyMLP, "cnn": TinyCNN, "twice": TwiceCalled}


@pytest.mark.parametrize("kind", sorted(MODELS))
@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam], ids=["sgd", "adam"])
def test_parameters_bit_identical_with_recorder(kind, optimizer_cls, tmp_path):
    torch.manual_seed(1)
    plain = MODELS[kind]()
    watched = copy.deepcopy(plain)
    data = batches("cnn" if kind == "cnn" else "mlp", steps=20)

    train(plain, data, optimizer_cls=optimizer_cls, lr=0.01)
    # flush_every=3 forces several flushes mid-training, so the flush path is covered too.
    train(watched, data, optimizer_cls=optimizer_cls, lr=0.01, run=tmp_path / "r", every=1, flush_every=3)

    assert_same_parameters(plain, watched, f"{kind} with gradscope attached")


def test_training_actually_changes_parameters():
    """Guards the test above against a loop that never updates anything."""
    torch.manual_seed(1)
    model = TinyCNN()
    before = copy.deepcopy(model.state_dict())
    train(model, batches("cnn", steps=3))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


#: Beyond small inputs (every model) and two-layer transformers: MLPs narrow and shallow, with a
#: bounded activation. A family not named here is tested at its default depth and width.
FAMILY_SIZES = {"mlp": {"depth": 6, "width": 16, "input_size": 4, "activation": "sigmoid"}}
STEPS = 5
FLUSH_EVERY = 2  # flushes after steps 1 and 3, mid-run, and the rest at close


@pytest.mark.parametrize("name", models.names())  # read at collection: a model registered later is in
def test_reference_models_bit_identical_with_blocks_measured(name, tmp_path):
    overrides = small_overrides(name, FAMILY_SIZES)
    plain, _ = train_reference(name, overrides, steps=STEPS)
    watched, rec = train_reference(name, overrides, run=tmp_path / "r", steps=STEPS, flush_every=FLUSH_EVERY)
    assert_same_parameters(plain, watched, f"{name} with gradscope attached")
    if declared_blocks(plain):
        assert rec.blocks, "blocks must be measured for this test to mean anything"
        assert len(gradscope.load_run(tmp_path / "r").blocks) > 0
