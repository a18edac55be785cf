"""The first non-finite layer of each pass, located at a flush from the recorded statistics:
a NaN put into one layer's output, or only into another's gradient, is named exactly."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import gradscope


class NaNGradient(torch.autograd.Function):
    """The identity forward; a NaN gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Linear(nn.Linear):
    """Its output, as its hooks see it, holds a NaN (forward) or gets a NaN gradient (backward) on demand."""

    poison: str | None = None

    def forward(self, x):
        y = super().forward(x)
        if self.poison == "forward":
            y = y.clone()
            y[0, 0] = float("nan")
        elif self.poison == "backward":
            y = NaNGradient.apply(y)
        return y


class Chain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Linear(8, 8) for _ in range(5)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _train(path, every, steps=12, at=None, forward_nan=None, backward_nan=None, **kwargs):
    model = Chain()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gradscope.watch(model, path, optimizer=opt, every=every, flush_every=2, **kwargs):
        for step in range(steps):
            for i, layer in enumerate(model.layers):
                layer.poison = "forward" if step == at and i == forward_nan else \
                    "backward" if step == at and i == backward_nan else None
            model(torch.randn(4, 8, generator=torch.Generator().manual_seed(step))).sum().backward()
            opt.step()
            opt.zero_grad()
    return gradscope.load_run(path)


@pytest.mark.parametrize("every", [1, 5])
def test_a_nan_in_one_layers_output_is_located(tmp_path, every):
    with pytest.warns(RuntimeWarning, match=r"step 5, forward pass: layers\.2 \(Linear\)") as caught:
        run = _train(tmp_path / "r", every, at=5, forward_nan=2)
    assert sum("first NaN or inf" in str(w.message) for w in caught) == 1  # warned once
    assert {w.filename for w in caught if "first NaN" in str(w.message)} == {__file__}  # the user's line
    forward = run.meta["nonfinite"][0]
    assert forward == {"step": 5, "phase": "forward", "layer": "layers.2", "type": "Linear",
                       "statistic": "act_mean", "index": 2}
    # the NaN loss makes every gradient NaN: the backward pass met it first at the last layer
    assert run.meta["nonfinite"][1]["phase"] == "backward"
    assert run.meta["nonfinite"][1]["layer"] == "layers.4"


@pytest.mark.parametrize("every", [1, 5])
def test_a_nan_only_in_another_layers_gradient_is_located(tmp_path, every):
    with pytest.warns(RuntimeWarning, match=r"step 5, backward pass: layers\.3 \(Linear\)"):
        run = _train(tmp_path / "r", every, at=5, backward_nan=3)
    # its own backward made its weight's gradient NaN from a finite dL/dy; layers.2 then received a NaN dL/dy
    assert run.meta["nonfinite"] == [{"step": 5, "phase": "backward", "layer": "layers.3", "type": "Linear",
                                      "statistic": "grad_norm", "index": 3}]
    (finding,) = [f for f in gradscope.diagnose(run) if f.code == "non_finite"]
    assert "backward pass, the parameters' gradient of layers.3 (Linear)" in finding.explanation


def test_raise_stops_at_the_flush_and_keeps_the_steps(tmp_path):
    with pytest.raises(FloatingPointError, match="step 3, forward pass: layers.1"):
        _train(tmp_path / "r", 1, at=3, forward_nan=1, on_nonfinite="raise")
    run = gradscope.load_run(tmp_path / "r")
    assert run.meta["status"] == "failed"
    assert 3 in set(run.scalars.step) | set(run.layers.step)
    assert run.meta["nonfinite"][0]["layer"] == "layers.1"


def test_a_clean_run_and_ignore_say_nothing(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = _train(tmp_path / "clean", 1, steps=4)
        ignored = _train(tmp_path / "ignored", 1, steps=4, at=1, forward_nan=0, on_nonfinite="ignore")
    assert clean.meta["nonfinite"] is None and ignored.meta["nonfinite"] is None


def test_a_bad_action_is_refused_before_any_file(tmp_path):
    with pytest.raises(ValueError, match="on_nonfinite must be one of warn, raise, ignore"):
        gradscope.watch(Chain(), tmp_path / "r", on_nonfinite="panic")
    assert not (tmp_path / "r").exists()


def test_a_parameter_no_module_owns_is_not_taken_for_the_source(tmp_path):
    """Such a parameter has a row (norms only) but no place in a pass; NaN reaches its gradient last."""

    class WithOwnParameter(Chain):
        def __init__(self):
            super().__init__()
            self.offset = nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return super().forward(x + self.offset)

    model = WithOwnParameter()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with pytest.warns(RuntimeWarning, match=r"backward pass: layers\.3"):
        with gradscope.watch(model, tmp_path / "r", optimizer=opt):
            for step in range(2):
                model.layers[3].poison = "backward" if step == 1 else None
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
    assert gradscope.load_run(tmp_path / "r").meta["nonfinite"][0]["layer"] == "layers.3"
