"""The recorder is an observer: training with it attached gives bit-identical parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gradscope
from gradscope import models

from gradscope.testing import TinyCNN, TinyMLP, TwiceCalled
from conftest import batches, train

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

    for (name, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{kind}: {name} differs with gradscope attached"


def test_training_actually_changes_parameters():
    """Guards the test above against a loop that never updates anything."""
    torch.manual_seed(1)
    model = TinyCNN()
    before = copy.deepcopy(model.state_dict())
    train(model, batches("cnn", steps=3))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


REFERENCE = {
    "resnet20": {"input_size": 8},
    "plain20": {"input_size": 8},
    "preresnet20": {"input_size": 8},
    "mlp_residual": {"depth": 6, "width": 16, "input_size": 4, "activation": "sigmoid"},
    "transformer_lm_post": {"depth": 2, "seq_len": 8},
    "transformer_seq2seq_pre": {"depth": 2, "seq_len": 8},
}


def train_reference(name, overrides, run=None, steps=20):
    torch.manual_seed(0)
    model = models.create(name, **overrides)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    data = [models.example_input(name, batch=8, seed=i, **overrides) for i in range(steps)]
    rec = gradscope.watch(model, run, optimizer=opt, flush_every=3) if run else None
    try:
        for x, y in data:
            out = model(*x) if isinstance(x, tuple) else model(x)
            loss = F.cross_entropy(out.flatten(0, -2), y.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        if rec is not None:
            rec.close()
    return model, rec


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_models_bit_identical_with_blocks_measured(name, tmp_path):
    plain, _ = train_reference(name, REFERENCE[name])
    watched, rec = train_reference(name, REFERENCE[name], run=tmp_path / "r")
    assert rec.blocks, "blocks must be measured for this test to mean anything"
    for (key, a), b in zip(plain.state_dict().items(), watched.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: {key} differs with gradscope attached"
    assert len(gradscope.load_run(tmp_path / "r").blocks) > 0
