"""Hooks are always removed, and a model cannot be watched twice at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gradscope
from gradscope.testing import TinyCNN, TinyMLP, assert_no_hooks, batches, hook_counts


def test_hooks_registered_while_watching_and_removed_on_close(run_dir):
    model = TinyCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gradscope.watch(model, run_dir, optimizer=opt)
    counts = hook_counts(model, opt)
    assert counts and all(v == 1 for v in counts.values())
    assert "<optimizer>._optimizer_step_pre_hooks" in counts
    rec.close()
    assert_no_hooks(model, opt)
    rec.close()  # idempotent
    assert gradscope.load_run(run_dir).status == "finished"


def test_hooks_removed_when_leaving_with_block(run_dir):
    model = TinyMLP()
    with gradscope.watch(model, run_dir) as rec:
        model(torch.randn(2, 8)).sum().backward()
        rec.step()
    assert rec.closed
    assert_no_hooks(model)


def test_hooks_removed_and_data_kept_when_training_raises(run_dir):
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches("mlp", steps=5)
    with pytest.raises(ZeroDivisionError):
        with gradscope.watch(model, run_dir, optimizer=opt):
            for i, (x, y) in enumerate(data):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if i == 2:
                    raise ZeroDivisionError("training failed")
    assert_no_hooks(model, opt)
    run = gradscope.load_run(run_dir)
    assert run.status == "failed"
    assert sorted(run.layers.step.unique()) == [0, 1, 2]  # steps before the error were written


def test_hooks_removed_when_a_module_raises_mid_forward(run_dir):
    model = TinyMLP()
    with gradscope.watch(model, run_dir):
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 5))  # wrong width: the first Linear raises
    assert_no_hooks(model)


def test_second_watch_is_a_clear_error(run_dir, tmp_path):
    model = TinyMLP()
    with gradscope.watch(model, run_dir):
        with pytest.raises(RuntimeError, match="already watched"):
            gradscope.watch(model, tmp_path / "other")
        with pytest.raises(RuntimeError, match="already watched"):
            gradscope.watch(model[0], tmp_path / "inner")  # a submodule of a watched model
        assert hook_counts(model) == {**{f"{i}._forward_hooks": 1 for i in (0, 2, 4, 6)},
                                      "<root>._forward_pre_hooks": 1,  # the model's step bookkeeping
                                      "<root>._forward_hooks": 1}  # releases the probes' work vector
    # once closed, watching again is fine
    with gradscope.watch(model, tmp_path / "again"):
        pass
    assert_no_hooks(model)


def test_closed_recorder_refuses_step(run_dir):
    model = TinyMLP()
    rec = gradscope.watch(model, run_dir)
    rec.close()
    with pytest.raises(RuntimeError, match="closed"):
        rec.step()


@pytest.mark.parametrize(
    "kwargs, match",
    [({"every": 0}, "every"), ({"flush_every": -1}, "flush_every"), ({"modules": "nope.*"}, "matched no module"),
     ({"modules": 3}, "modules=")],
)
def test_bad_arguments_are_clear_errors(kwargs, match, run_dir):
    model = TinyMLP()
    with pytest.raises((ValueError, TypeError), match=match):
        gradscope.watch(model, run_dir, **kwargs)
    assert_no_hooks(model)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        gradscope.watch(lambda x: x)
