"""Compiled models: gradscope's hooks run inside ``torch.compile``d models, or watch() refuses.

Dynamo never runs module hooks added after a compiled model's first call, and removing one
makes it recompile without it (docs/design.md, "Compiled models"). With ``every > 1`` the
probes used to come and go with the schedule, so a compiled model recorded step 0 and then
nothing. These tests use Dynamo's ``eager`` backend (the hooks' fate is Dynamo's, not
Inductor's, and it compiles in milliseconds) and Inductor runs for the figures (a tiny CNN; resnet20
at every recorded step).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gradscope
from gradscope.testing import (
    TinyCNN,
    TinyMLP,
    assert_no_hooks,
    assert_same_parameters,
    batches,
    reference_batches,
    train,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model, how, backend="eager"):
    if how == "torch.compile":
        return torch.compile(model, backend=backend)
    model.compile(backend=backend)
    return model


def _record(model, run, every, compile_how=None, watch_first=True, steps=12, backend="eager"):
    data = batches("mlp", steps=steps)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    if watch_first:
        rec = gradscope.watch(model, run, optimizer=opt, every=every, flush_every=4)
        runner = _compiled(model, compile_how, backend) if compile_how else model
    else:
        runner = _compiled(model, compile_how, backend)
        rec = gradscope.watch(runner, run, optimizer=opt, every=every, flush_every=4)
    with rec:
        for x, y in data:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(runner(x), y)
            loss.backward()
            rec.step(loss=loss)
            opt.step()
    return gradscope.load_run(run), runner


COLUMNS = ["act_mean", "act_std", "act_absmax", "act_zero_frac", "grad_out_norm", "param_norm", "grad_norm"]


def _figures(run):
    layers = run.layers[run.layers.phase == "train"].set_index(["step", "layer"]).sort_index()
    return layers[COLUMNS].astype(float)


@pytest.mark.parametrize(("compile_how", "watch_first", "every"), [
    ("torch.compile", True, 1), ("torch.compile", True, 3), ("torch.compile", False, 3),
    ("model.compile", True, 3), ("model.compile", False, 1)])
def test_compiled_model_records_every_scheduled_step_as_eager(tmp_path, compile_how, watch_first, every):
    torch.manual_seed(0)
    eager_model = TinyMLP()
    compiled_model = copy.deepcopy(eager_model)
    eager, _ = _record(eager_model, tmp_path / "eager", every)
    compiled, runner = _record(compiled_model, tmp_path / "compiled", every, compile_how, watch_first)

    assert compiled.meta["status"] == "finished", compiled.meta["errors"]
    expected_steps = list(range(0, 12, every))
    assert sorted(compiled.layers.step.unique()) == expected_steps  # every scheduled step, none missing
    a, b = _figures(eager), _figures(compiled)
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)
    assert_same_parameters(eager_model, compiled_model, f"{compile_how}, every={every}")
    assert_no_hooks(compiled_model)


def test_inductor_compiled_model_matches_eager(tmp_path):
    torch.manual_seed(0)
    eager_model = TinyCNN()
    compiled_model = copy.deepcopy(eager_model)
    data = batches("cnn", steps=4)
    eager_rec = train(eager_model, data, run=tmp_path / "eager", every=2)
    runner = torch.compile(compiled_model)  # Inductor; watched through the wrapper
    compiled_rec = train(runner, data, run=tmp_path / "compiled", every=2)
    eager, compiled = gradscope.load_run(eager_rec.path), gradscope.load_run(compiled_rec.path)
    assert compiled.meta["status"] == "finished"
    assert list(compiled.layers.layer.unique()) == list(eager.layers.layer.unique())  # _orig_mod. removed
    a, b = _figures(eager), _figures(compiled)
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compile_how", ["torch.compile", "model.compile"])
def test_watch_after_the_compiled_model_ran_records_or_refuses_with_the_reason(tmp_path, compile_how):
    """torch.compile(model) never runs hooks added after its first call: the first recorded
    step is refused, with why and what to do. model.compile() notices new hooks (it recompiles):
    then the steps are recorded, as in eager."""
    torch.manual_seed(0)
    model = TinyMLP()
    reference = copy.deepcopy(model)
    runner = _compiled(model, compile_how)
    x, y = next(iter(batches("mlp", steps=1)))
    runner(x)  # compiled and called before watch()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = gradscope.watch(runner, tmp_path / "r", optimizer=opt)
    torch.nn.functional.cross_entropy(runner(x), y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    if compile_how == "torch.compile":
        with pytest.raises(RuntimeError, match="compiled .* and called before watch"):
            opt.step()
        assert rec.closed
        run = gradscope.load_run(tmp_path / "r")
        assert run.meta["status"] == "failed"
        assert any("called before watch" in e for e in run.meta["errors"])
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step was refused
        assert_no_hooks(model, opt)
        return
    opt.step()
    rec.close()
    eager_rec = gradscope.watch(reference, tmp_path / "eager")
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    eager_rec.step()
    eager_rec.close()
    a, b = _figures(gradscope.load_run(tmp_path / "eager")), _figures(gradscope.load_run(tmp_path / "r"))
    assert a.index.equals(b.index)
    np.testing.assert_allclose(b.to_numpy(), a.to_numpy(), rtol=1e-5, atol=1e-7)


def test_a_step_that_ran_no_forward_is_not_refused(tmp_path):
    """Gradients without any forward in the step (a second rec.step() per iteration) are no
    sign of hooks that never run once some hook has run."""
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = next(iter(batches("mlp", steps=1)))
    with gradscope.watch(model, tmp_path / "r") as rec:
        torch.nn.functional.cross_entropy(model(x), y).backward()
        rec.step()
        rec.step()  # gradients still there, no forward
    assert gradscope.load_run(tmp_path / "r").meta["status"] == "finished"


def test_compiled_step_does_not_recompile_after_warm_up(tmp_path):
    """every=3 across 12 steps: the schedule flips the probes' work on and off, which may take one
    more compiled variant, but never one per step (Dynamo's cache limit would fall back to eager)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    counters.clear()
    _record(TinyMLP(), tmp_path / "r", every=3, compile_how="torch.compile", steps=6)
    warm = counters["stats"]["unique_graphs"]
    counters.clear()
    _record(TinyMLP(), tmp_path / "r2", every=3, compile_how="torch.compile", steps=12)
    assert counters["stats"]["unique_graphs"] <= warm


def test_modules_called_through_forward_are_refused_not_recorded_empty(tmp_path):
    """The same check in eager: a module called as ``m.forward(x)`` skips its hooks."""

    class Direct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            return self.fc.forward(x)

    model = Direct()
    x, y = next(iter(batches("mlp", steps=1)))
    rec = gradscope.watch(model, tmp_path / "r")
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"\.forward\(\)"):
        rec.step()
    assert gradscope.load_run(tmp_path / "r").meta["status"] == "failed"


def test_a_sibling_instance_compiled_first_is_refused_or_recorded_with_hook_guards(tmp_path):
    """Dynamo does not guard on module hooks: a second instance of a class whose first instance
    was compiled and called runs that code, without gradscope's hooks. Refused, saying so; with
    ``skip_nnmodule_hook_guards = False`` Dynamo recompiles for the hooks and the step is recorded."""
    x, y = next(iter(batches("mlp", steps=1)))
    for guards in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        first, second = TinyMLP(), TinyMLP()
        old = torch._dynamo.config.skip_nnmodule_hook_guards
        torch._dynamo.config.skip_nnmodule_hook_guards = not guards
        try:
            torch.compile(first, backend="eager")(x)
            rec = gradscope.watch(second, tmp_path / f"guards-{guards}")
            torch.nn.functional.cross_entropy(torch.compile(second, backend="eager")(x), y).backward()
            if not guards:
                with pytest.raises(RuntimeError, match="another instance of its class"):
                    rec.step()
                continue
            rec.step()
            rec.close()
        finally:
            torch._dynamo.config.skip_nnmodule_hook_guards = old
        run = gradscope.load_run(tmp_path / "guards-True")
        assert run.meta["status"] == "finished"
        assert run.layers.act_std.notna().all()


def record_compiled_against_eager(tmp_path, device, mode, every=2, steps=6):
    """resnet20 trained eager and ``torch.compile(mode=mode)``d from the same seed, both watched;
    returns both runs and the Dynamo/Inductor counters of the compiled one (after warm-up, at
    step 3, a recompilation raises). The learning rate is 0: every step's figures then depend on
    its batch alone, so the runs compare at every recorded step without the compiled model's own
    rounding drifting from eager's over training. TF32 is off so both compare in float32."""
    from torch._dynamo.utils import counters

    from gradscope import models

    data = [tuple(t.to(device) for t in batch) for batch in reference_batches("resnet20", steps, batch=16)]
    runs = {}
    tf32, torch.backends.cudnn.allow_tf32 = torch.backends.cudnn.allow_tf32, False
    try:
        for compiled in (False, True):
            torch._dynamo.reset()
            counters.clear()
            torch.manual_seed(0)
            model = models.create("resnet20").to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            path = tmp_path / ("compiled" if compiled else "eager")
            with gradscope.watch(model, path, optimizer=opt, every=every, flush_every=4) as rec:
                runner = torch.compile(model, mode=mode) if compiled else model
                for step, (x, y) in enumerate(data):
                    torch._dynamo.config.error_on_recompile = compiled and step >= 3
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(runner(x), y)
                    loss.backward()
                    rec.step(loss=loss)
                    opt.step()
            torch._dynamo.config.error_on_recompile = False
            runs[compiled] = gradscope.load_run(path)
        return runs[False], runs[True], {k: dict(v) for k, v in counters.items()}
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def assert_same_figures(eager, compiled):
    """Every float figure of the layer and block tables, step by step, as in eager: forward ones
    within 1e-4 (a mean against its layer's spread), the probes' gradient norms within 1e-3 and the
    parameters' gradient norms within 2e-2, since Inductor computes the model's backward in its own
    order (resnet20 on the CPU at lr 0: 2e-6, 1e-4 and 2.3e-3 apart). Another step's batch moves
    them by 25%."""
    for table, keys in (("layers", ["step", "phase", "layer"]), ("blocks", ["step", "block"])):
        a = getattr(eager, table).set_index(keys).sort_index()
        b = getattr(compiled, table).set_index(keys).sort_index()
        assert a.index.equals(b.index), table
        for column in [c for c in a.columns if a[c].dtype.kind == "f"]:
            x, y = a[column].to_numpy(float), b[column].to_numpy(float)
            rtol = 2e-2 if column == "grad_norm" else 1e-3 if "grad" in column else 1e-4
            atol = np.nan_to_num(a["act_std"].to_numpy(float)) * 1e-4 if column == "act_mean" else 1e-7
            close = (abs(y - x) <= atol + rtol * abs(x)) | (np.isnan(x) & np.isnan(y))
            assert close.all(), f"{table}.{column}: eager {x[~close][:4]}, compiled {y[~close][:4]}"


@pytest.mark.slow  # Inductor compiles resnet20's forward and backward: about 80 s on 2 cores, cold
def test_inductor_records_every_scheduled_step_of_resnet20_as_eager(tmp_path):
    """Under Inductor (the CPU's; CUDA graphs: tests/test_cuda.py) every scheduled step of a
    model with BatchNorm and blocks is recorded from the staging, with eager's figures, and
    nothing recompiles after warm-up."""
    eager, compiled, counters = record_compiled_against_eager(tmp_path, "cpu", None)
    assert compiled.meta["status"] == "finished", compiled.meta.get("errors")
    assert sorted(compiled.layers.step.unique()) == [0, 2, 4]
    assert counters["stats"]["unique_graphs"] == 1
    assert_same_figures(eager, compiled)
    assert compiled.blocks.id_rel_residual.notna().any() and compiled.blocks.grad_out_norm.notna().any()
