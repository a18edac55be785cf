"""Batched reductions (the GPU path): held outputs and gradients give the same statistics.

On a CPU the batcher is forced on with ``kernels.MODE = "torch"`` (the kernels' arithmetic in
torch ops); the Triton kernels themselves are checked against float64 by tests/test_kernels.py
(on a GPU, or in Triton's interpreter where Triton is installed), and in training by
tests/test_cuda.py.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradscope
from gradscope import models
from gradscope.recording import batching, kernels
from gradscope.testing import TinyCNN, TinyMLP, TwiceCalled, assert_same_parameters, batches, reference_batches, train


class Bounded(nn.Module):
    """Tanh (saturation counted) and ReLU6 layers, a shape for the channels-last path."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.tanh = nn.Tanh()
        self.relu6 = nn.ReLU6()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu6(self.tanh(self.conv(x.contiguous(memory_format=torch.channels_last)) * 3) * 4)
        return self.head(h.mean(dim=(2, 3)))


def _model(kind: str) -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    if kind in ("resnet20", "transformer_lm_pre"):
        overrides = {"depth": 2} if kind == "transformer_lm_pre" else {}
        return models.create(kind, **overrides), reference_batches(kind, 4, batch=4, **overrides)
    model = {"cnn": TinyCNN, "mlp": TinyMLP, "twice": TwiceCalled, "bounded": Bounded}[kind]()
    return model, batches("cnn" if kind in ("cnn", "bounded") else "mlp", 4, seed=1, batch=6)


def _train(model, data, run=None):
    """SGD with momentum; the recorder's steps end at the optimizer's, with no ``rec.step()``."""
    return train(model, data, run=run, lr=0.05, momentum=0.9, call_step=False)


def _assert_same_tables(a: gradscope.Run, b: gradscope.Run) -> None:
    for table in ("layers", "blocks"):
        x, y = getattr(a, table), getattr(b, table)
        assert list(x.columns) == list(y.columns) and len(x) == len(y), table
        for column in x.columns:
            if x[column].dtype.kind == "f":
                np.testing.assert_allclose(y[column].to_numpy(), x[column].to_numpy(), rtol=2e-5, atol=1e-7,
                                           err_msg=f"{table}.{column}")
            else:
                assert x[column].tolist() == y[column].tolist(), f"{table}.{column}"


@pytest.mark.parametrize("kind", ["cnn", "mlp", "twice", "bounded", "resnet20", "transformer_lm_pre"])
def test_batched_statistics_equal_immediate_ones_and_training_is_untouched(kind, tmp_path, monkeypatch):
    base, data = _model(kind)
    plain = copy.deepcopy(base)
    _train(plain, data)
    immediate = copy.deepcopy(base)
    _train(immediate, data, tmp_path / "immediate")
    monkeypatch.setattr(kernels, "MODE", "torch")
    batched = copy.deepcopy(base)
    rec = _train(batched, data, tmp_path / "batched")
    assert rec._batcher is not None and rec._batcher.holdable  # held and reduced together
    _assert_same_tables(gradscope.load_run(tmp_path / "immediate"), gradscope.load_run(tmp_path / "batched"))
    assert_same_parameters(plain, batched)


def test_outputs_changed_in_place_are_never_held(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "MODE", "torch")
    model, data = _model("cnn")
    rec = _train(model, data, tmp_path / "r")
    names = {layer.row: layer.name for layer in rec.layers}
    # BatchNorm outputs are overwritten by ReLU(inplace=True): learned at step 0, never held
    assert {names[r] for r in rec._batcher.immediate} == {"features.1", "features.4"}
    assert {names[r] for r in rec._batcher.holdable} == {"features.0", "features.3", "head"}


class Clobbered(nn.Module):
    """A layer whose output the parent overwrites in place, but only from step ``after`` on (and
    only at that step, unless ``twice``: then the layer runs twice per forward and its first
    output is overwritten before the second call at every step from ``after`` on)."""

    def __init__(self, after: int, twice: bool = False) -> None:
        super().__init__()
        self.lin, self.head, self.after, self.calls, self.twice = nn.Linear(8, 8), nn.Linear(8, 4), after, 0, twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if self.training and (self.calls >= self.after if self.twice else self.calls == self.after):
            h.mul_(2)  # allowed by autograd: Linear's backward does not need its output
        if self.twice:
            h = h + self.lin(x * 3)
        self.calls += 1
        return self.head(torch.relu(h))


def test_a_held_output_changed_later_is_dropped_not_recorded_wrong(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "MODE", "torch")
    torch.manual_seed(0)
    model = Clobbered(after=1)
    data = batches("mlp", 3, seed=0, batch=6)
    outputs = []
    model.lin.register_forward_hook(lambda m, i, o: outputs.append(o.detach().double().clone()))
    rec = _train(model, data, tmp_path / "r")
    lin = gradscope.load_run(tmp_path / "r").layers.query("layer == 'lin' and phase == 'train'").set_index("step")
    assert np.isnan(lin.loc[1, "act_mean"]) and np.isnan(lin.loc[1, "act_std"])  # the clobbered call: dropped
    for step in (0, 2):  # learned at 0, then immediate again after the surprise
        assert lin.loc[step, "act_mean"] == pytest.approx(float(outputs[step].mean()), rel=1e-5)
        assert lin.loc[step, "act_std"] == pytest.approx(float(outputs[step].std(unbiased=False)), rel=1e-5)
    assert lin.grad_out_norm.notna().all()  # gradients are unaffected
    assert [layer.name for layer in rec.layers if layer.row in rec._batcher.immediate] == ["lin"]


def test_a_dropped_first_call_leaves_the_second_recorded_alone(tmp_path, monkeypatch):
    """The second call of a layer whose held first call was changed in place is recorded as the
    step's only call: its own moments and count, not merged with a call that was dropped."""
    monkeypatch.setattr(kernels, "MODE", "torch")
    torch.manual_seed(0)
    model = Clobbered(after=1, twice=True)
    data = batches("mlp", 2, seed=0, batch=6)
    outputs = []
    model.lin.register_forward_hook(lambda m, i, o: outputs.append(o.detach().double().clone()))
    _train(model, data, tmp_path / "r")
    lin = gradscope.load_run(tmp_path / "r").layers.query("layer == 'lin' and phase == 'train'").set_index("step")
    both = torch.cat([outputs[0], outputs[1]])  # step 0: nothing changed, the two calls merged
    assert lin.loc[0, "act_mean"] == pytest.approx(float(both.mean()), rel=1e-5)
    assert lin.loc[0, "act_std"] == pytest.approx(float(both.std(unbiased=False)), rel=1e-5)
    second = outputs[3]  # step 1: the first call (held, then doubled in place) is dropped
    assert lin.loc[1, "act_mean"] == pytest.approx(float(second.mean()), rel=1e-5)
    assert lin.loc[1, "act_std"] == pytest.approx(float(second.std(unbiased=False)), rel=1e-5)
    assert lin.loc[1, "act_absmax"] == pytest.approx(float(second.abs().max()), rel=1e-5)


class BranchAddedInPlace(nn.Module):
    """A residual block y = F(x) + x. From step ``after`` on (only at that step, unless ``always``)
    it adds x to F(x) in place, as torchvision's BasicBlock does (``out += identity``): the
    branch's output no longer holds F(x) at the forward's end."""

    def __init__(self, after: int, always: bool = False) -> None:
        super().__init__()
        self.branch, self.after, self.always, self.calls = nn.Linear(8, 8), after, always, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.branch(x)
        in_place = self.training and (self.calls >= self.after if self.always else self.calls == self.after)
        self.calls += 1
        return f.add_(x) if in_place else f + x


class WithBranch(nn.Module):
    """``BranchAddedInPlace`` declared as a block with its branch, then a head."""

    def __init__(self, after: int, always: bool = False) -> None:
        super().__init__()
        self.block, self.head = BranchAddedInPlace(after, always), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.block(x)))

    def gradscope_blocks(self):
        return [gradscope.BlockSpec("block", branch="block.branch")]


def _branch_model(after: int, always: bool = False) -> tuple[nn.Module, list[float]]:
    """A ``WithBranch`` and the list its block's true ||F(x)|| / ||x|| go to at each forward."""
    torch.manual_seed(0)
    model = WithBranch(after, always)
    ratios: list[float] = []
    model.block.branch.register_forward_hook(
        lambda m, i, o: ratios.append(float(o.detach().double().norm() / i[0].double().norm())))
    return model, ratios


@pytest.mark.parametrize("always", [True, False])
def test_a_branch_output_changed_in_place_is_never_recorded_wrong(always, tmp_path, monkeypatch):
    """A branch whose F(x) survives the forward is held (one launch for many blocks); one that the
    block overwrites is reduced at once, and a held one overwritten later is dropped for that step."""
    monkeypatch.setattr(kernels, "MODE", "torch")
    model, ratios = _branch_model(after=0 if always else 1, always=always)
    data = [(torch.randn(6, 8), torch.randint(0, 4, (6,))) for _ in range(3)]
    rec = _train(model, data, tmp_path / "r")
    got = gradscope.load_run(tmp_path / "r").blocks.set_index("step").branch_ratio
    key = len(rec.layers)  # the block's branch, as the batcher learns it
    if always:  # learned at step 0: reduced at once every step, never lost
        assert got.tolist() == pytest.approx(ratios, rel=1e-5)
        assert key in rec._batcher.immediate
    else:  # held from step 1, overwritten there: that step's ratio is missing, not wrong
        assert np.isnan(got[1]) and got[[0, 2]].tolist() == pytest.approx([ratios[0], ratios[2]], rel=1e-5)
        assert key in rec._batcher.immediate


def test_a_branch_output_left_alone_is_held(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "MODE", "torch")
    model, ratios = _branch_model(after=99)
    data = [(torch.randn(6, 8), torch.randint(0, 4, (6,))) for _ in range(3)]
    rec = _train(model, data, tmp_path / "r")
    assert len(rec.layers) in rec._batcher.holdable
    got = gradscope.load_run(tmp_path / "r").blocks.set_index("step").branch_ratio
    assert got.tolist() == pytest.approx(ratios, rel=1e-5)


def test_holding_little_memory_reduces_early_with_the_same_results(tmp_path, monkeypatch):
    model, data = _model("resnet20")
    monkeypatch.setattr(kernels, "MODE", "torch")
    _train(copy.deepcopy(model), data, tmp_path / "default")
    calls = []
    reduce = kernels.reduce_moments_by_torch
    monkeypatch.setattr(kernels, "reduce_moments_by_torch", lambda t, *a: (calls.append(len(t)), reduce(t, *a)))
    monkeypatch.setattr(batching, "HOLD_BYTES", 1)  # every tensor reduced as soon as it is held
    _train(copy.deepcopy(model), data, tmp_path / "early")
    assert calls and max(calls) == 1
    _assert_same_tables(gradscope.load_run(tmp_path / "default"), gradscope.load_run(tmp_path / "early"))


def test_a_failing_kernel_falls_back_to_torch_once_with_a_warning(tmp_path, monkeypatch):
    model, data = _model("mlp")
    _train(copy.deepcopy(model), data, tmp_path / "immediate")

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "MODE", "torch")
    monkeypatch.setattr(kernels, "uses_triton", lambda device: True)
    monkeypatch.setattr(kernels, "reduce_moments", broken)
    monkeypatch.setattr(kernels, "reduce_moment", broken)
    monkeypatch.setattr(kernels, "reduce_squares", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(copy.deepcopy(model), data, tmp_path / "fallback")
    assert [str(w.message) for w in caught if "kernel failed" in str(w.message)] == [
        "gradscope: batched statistics kernel failed (RuntimeError: no compiler); "
        "reducing tensors one at a time from now on"]
    _assert_same_tables(gradscope.load_run(tmp_path / "immediate"), gradscope.load_run(tmp_path / "fallback"))


def test_batching_is_on_for_cuda_with_triton_unless_the_environment_says_no(monkeypatch):
    monkeypatch.setattr(kernels, "MODE", None)
    monkeypatch.setattr(kernels, "triton_available", lambda device: device.type == "cuda")
    monkeypatch.delenv("GRADSCOPE_BATCHING", raising=False)
    assert batching.enabled(torch.device("cuda")) and not batching.enabled(torch.device("cpu"))
    monkeypatch.setenv("GRADSCOPE_BATCHING", "0")
    assert not batching.enabled(torch.device("cuda"))
    monkeypatch.setattr(kernels, "MODE", "torch")  # tests force it on anywhere
    assert batching.enabled(torch.device("cpu"))
