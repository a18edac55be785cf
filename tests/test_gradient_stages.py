"""Where a framework reads gradients: before or after its clip, through its optimizer wrapper.

``read_gradients(clipped=)`` takes a step's statistics between the backward and ``optimizer.step()``;
the global norm on the other side of the clip lands in its own column, so the run never leaves a
reader guessing which norm it holds.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import gradscope
from gradscope.recording.optimizers import unwrap_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _batch(i: int) -> torch.Tensor:
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) * 10


def test_pre_clip_statistics_and_both_norms(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pre_norms, first_layer = [], []
    with gradscope.watch(model, tmp_path / "r", optimizer=opt) as rec:
        for i in range(3):
            loss = model(_batch(i)).pow(2).mean()
            loss.backward()
            rec.read_gradients(clipped=False)
            first_layer.append(torch.cat([model[0].weight.grad.flatten(), model[0].bias.grad]).norm().item())
            pre_norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5).item())
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss)
    run = gradscope.load_run(tmp_path / "r")
    s = run.scalars.set_index("step")
    assert list(s.index) == [0, 1, 2]
    assert min(pre_norms) > 0.5  # every step was clipped
    assert s.grad_norm_pre_clip.tolist() == pytest.approx(pre_norms, rel=1e-5)
    assert s.grad_global_norm.tolist() == pytest.approx(pre_norms, rel=1e-5)  # statistics are pre-clip
    assert s.grad_norm_post_clip.tolist() == pytest.approx([0.5] * 3, rel=1e-4)
    layer = run.layers[(run.layers.layer == "0") & (run.layers.phase == "train")].set_index("step")
    assert layer.grad_norm.tolist() == pytest.approx(first_layer, rel=1e-5)  # its own parameters', before the clip
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["gradients"] == "pre-clip"


def test_clip_norm_given_to_step_and_statistics_read_at_the_update(tmp_path):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    pre = []
    with gradscope.watch(model, tmp_path / "r", optimizer=opt) as rec:
        for i in range(2):
            loss = model(_batch(i)).pow(2).mean()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            pre.append(norm.item())
            rec.step(loss=loss, grad_norm_pre_clip=norm)  # a device tensor: no wait
            opt.step()
            opt.zero_grad()
    s = gradscope.load_run(tmp_path / "r").scalars.set_index("step")
    assert s.grad_norm_pre_clip.tolist() == pytest.approx(pre, rel=1e-5)
    assert s.grad_global_norm.tolist() == pytest.approx([0.5, 0.5], rel=1e-4)  # what optimizer.step() saw
    assert json.loads((tmp_path / "r" / "meta.json").read_text())["gradients"] == "optimizer.step()"


def test_a_step_the_optimizer_skipped_ends_at_the_next_forward(tmp_path):
    """An AMP scaler that finds inf skips optimizer.step(): the read step must not swallow the next."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, tmp_path / "r", optimizer=opt) as rec:
        for i in range(3):
            loss = model(_batch(i)).pow(2).mean()
            loss.backward()
            rec.read_gradients(clipped=True)
            rec.read_gradients(clipped=True)  # once per step: a second call changes nothing
            if i != 1:
                opt.step()
            opt.zero_grad()
    run = gradscope.load_run(tmp_path / "r")
    assert sorted(run.scalars.step) == [0, 1, 2]
    assert run.meta["schedule"]["last_step"] == 3
    train = run.layers[run.layers.phase == "train"]
    assert (train.groupby("step").size() == train.groupby("step").size().iloc[0]).all()


def test_read_gradients_needs_an_optimizer(tmp_path):
    model = _model()
    with gradscope.watch(model, tmp_path / "r") as rec:
        with pytest.raises(RuntimeError, match="needs watch\\(optimizer"):
            rec.read_gradients(clipped=False)


def test_wrappers_are_unwrapped_and_named(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    model = _model()
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    assert not hasattr(opt, "_optimizer_step_pre_hooks")  # what crashed watch() before
    with gradscope.watch(model, tmp_path / "r", optimizer=opt) as rec:
        for i in range(3):
            loss = model(_batch(i)).pow(2).mean()
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss)
    run = gradscope.load_run(tmp_path / "r")
    assert sorted(run.scalars.step) == [0, 1, 2]
    assert run.scalars.lr.tolist() == [0.01] * 3
    assert run.meta["optimizer"]["class"] == "SGD"
    assert run.meta["optimizer"]["wrapped_by"] == ["AcceleratedOptimizer"]


def test_something_that_is_no_optimizer_is_refused(tmp_path):
    class Holder:
        optimizer = "not one"

    for bad in (object(), Holder()):
        with pytest.raises(TypeError, match="optimizer= must be a torch.optim.Optimizer"):
            gradscope.watch(_model(), tmp_path / "r", optimizer=bad)
    assert not (tmp_path / "r").exists()
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    assert unwrap_optimizer(sgd) == (sgd, [])


def test_a_step_given_a_closure_is_read_after_its_backward(tmp_path):
    """step(closure) runs the forward and backward inside (LBFGS; Lightning's automatic
    optimization): the step's gradients exist only after it, not at its pre-hook."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    seen = []

    def closure(i):
        opt.zero_grad()
        loss = model(_batch(i)).pow(2).mean()
        loss.backward()
        seen.append(torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item())
        return loss

    with gradscope.watch(model, tmp_path / "r", optimizer=opt):
        for i in range(3):
            opt.step(lambda i=i: closure(i))
    s = gradscope.load_run(tmp_path / "r").scalars.set_index("step")
    assert list(s.index) == [0, 1, 2]
    assert s.grad_global_norm.tolist() == pytest.approx(seen, rel=1e-5)  # not None, not the step before's


def test_a_closure_run_several_times_is_one_step(tmp_path):
    """LBFGS (or SAM) runs its closure, forward and backward, several times inside one step."""
    model = _model()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=4)

    def closure(i, rec):
        opt.zero_grad()
        loss = model(_batch(i)).pow(2).mean()
        loss.backward()
        rec.read_gradients(clipped=False)
        return loss

    with gradscope.watch(model, tmp_path / "r", optimizer=opt) as rec:
        for i in range(2):
            opt.step(lambda i=i: closure(i, rec))
    run = gradscope.load_run(tmp_path / "r")
    assert sorted(run.scalars.step) == [0, 1] and run.meta["schedule"]["last_step"] == 2
    assert {layer["calls"] for layer in run.meta["layers"]} == {4}  # every forward of the step, in it
