"""The recorder is an observer: training with it attached gives bit-identical parameters."""

from __future__ import annotations

import copy

import pytest
import torch

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
