"""A watched model can be copied while it trains: an EMA model or a best-model snapshot
(``copy.deepcopy``), the whole module saved (``torch.save``). The copy is not watched, and the run
is as it would be without it (``recording/copies.py``). Before, both raised ``TypeError: cannot
pickle '_thread.lock' object``: the hooks held the recorder."""

from __future__ import annotations

import copy
import io

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope.recording.copies import unwatched
from gradscope.testing import Residual, TinyCNN, assert_same_parameters, batches


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), Residual(16), Residual(16), nn.Linear(16, 4))  # two blocks


def _module_hooks(model: nn.Module) -> list:
    return [hook for m in model.modules() for hooks in (m._forward_pre_hooks, m._forward_hooks)
            for hook in hooks.values()]


def _train(model: nn.Module, run, *, copies: bool, compiled: bool, **watch_kwargs) -> list[nn.Module]:
    """Four recorded steps; with ``copies``, an EMA copy made before the first forward that runs
    its own forward and backward after each step, and a snapshot copied after each step."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gradscope.watch(model, run, optimizer=opt, **watch_kwargs)
    call = torch.compile(model, backend="aot_eager") if compiled else model
    made = [copy.deepcopy(model)] if copies else []
    for x, y in batches("mlp", 4):
        opt.zero_grad()
        loss = F.cross_entropy(call(x), y)
        loss.backward()
        rec.step(loss=loss)
        opt.step()
        if copies:
            ema = made[0]
            with torch.no_grad():
                for shadow, p in zip(ema.parameters(), model.parameters(), strict=True):
                    shadow.lerp_(p, 0.5)
            F.cross_entropy(ema(x), y).backward()  # the copy's own training forward and backward
            made.append(copy.deepcopy(model))
    rec.close()
    return made


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("noise_scale", [False, True], ids=["plain", "noise_scale"])
def test_copies_of_a_watched_model_are_not_watched_and_leave_the_run_as_it_was(tmp_path, compiled, noise_scale):
    torch._dynamo.reset()
    alone, with_copies = _model(), _model()
    _train(alone, tmp_path / "alone", copies=False, compiled=compiled, noise_scale=noise_scale)
    made = _train(with_copies, tmp_path / "copies", copies=True, compiled=compiled, noise_scale=noise_scale)

    a, b = gradscope.load_run(tmp_path / "alone"), gradscope.load_run(tmp_path / "copies")
    assert b.meta["status"] == "finished", b.meta["errors"]
    assert sorted(b.layers.step.unique()) == [0, 1, 2, 3] and len(b.blocks)
    for table in ("layers", "blocks", "scalars"):
        pd.testing.assert_frame_equal(getattr(a, table), getattr(b, table))
    assert_same_parameters(alone, with_copies)
    for c in made:  # each of gradscope's hooks is a hook that does nothing in the copy
        hooks = _module_hooks(c)
        assert hooks and all(h is unwatched for h in hooks)
    snapshot = made[-1]  # the parameters as they were when copied: the model's last ones
    assert_same_parameters(snapshot, with_copies)


def test_a_watched_model_saved_whole_loads_unwatched(tmp_path):
    model = TinyCNN()
    x, y = batches("cnn", 1)[0]
    with gradscope.watch(model, tmp_path / "run") as rec:
        F.cross_entropy(model(x), y).backward()
        rec.step()
        buffer = io.BytesIO()
        torch.save(model, buffer)
        out = model.eval()(x)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    hooks = _module_hooks(loaded)
    assert hooks and all(h is unwatched for h in hooks)
    torch.testing.assert_close(loaded.eval()(x), out, rtol=0, atol=0)
    assert gradscope.load_run(tmp_path / "run").meta["status"] == "finished"
