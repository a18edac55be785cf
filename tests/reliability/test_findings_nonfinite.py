"""A layer that emits NaN or inf while the loss stays finite (torch.nan_to_num downstream) is a
critical finding that names it, a note in the report, and ``nan``/``inf`` in ``inspect``;
values that were simply not recorded stay ``-`` and raise nothing."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
import torch
from gradscope.cli.summary import run_summary
from torch import nn

import gradscope
from gradscope import reports
from gradscope.analysis.findings import non_finite_cells
from gradscope.testing import batches, train


class Poisoned(nn.Linear):
    """A linear layer whose output goes bad inside its own forward (as a bad op in a model does):
    ``value`` in the first sample's row, or, with ``everywhere``, every element times ``value``
    (which also poisons the gradient reaching its parameters)."""

    def __init__(self, d: int, value: float, everywhere: bool = False) -> None:
        super().__init__(d, d)
        self.value, self.everywhere = value, everywhere

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.everywhere:
            return y * self.value
        first = (torch.arange(y.shape[0]) == 0)[:, None].expand_as(y)
        return torch.where(first, torch.full_like(y, self.value), y)


class Hidden(nn.Module):
    """Linear -> ReLU -> Poisoned -> nan_to_num -> tanh -> Linear: the loss never sees the NaN."""

    def __init__(self, value: float = float("nan"), everywhere: bool = False, frozen_first: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.bad = Poisoned(16, value, everywhere)
        self.out = nn.Linear(16, 4)
        self.unused = nn.Linear(4, 4)  # watched, never called: its rows hold only parameter norms
        if frozen_first:
            self.a.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nan_to_num(self.bad(torch.relu(self.a(x))), nan=0.0, posinf=1.0, neginf=-1.0)
        return self.out(torch.tanh(h))


def record(path, **kwargs) -> gradscope.Run:
    torch.manual_seed(0)
    train(Hidden(**kwargs), batches("mlp", 3), run=path)
    return gradscope.load_run(path)


@pytest.fixture(scope="module")
def hidden_nan(tmp_path_factory):
    return record(tmp_path_factory.mktemp("nan") / "hidden", frozen_first=True)


def non_finite(run):
    return [f for f in gradscope.diagnose(run) if f.code == "non_finite"]


def test_a_nan_hidden_downstream_is_a_critical_finding_naming_the_layer(hidden_nan):
    run = hidden_nan
    assert np.isfinite(run.scalars.loss).all() and np.isfinite(run.scalars.grad_global_norm).all()  # hidden
    [f] = non_finite(run)
    assert f.severity == "critical" and f.layers == ["bad"] and f.steps == [0]
    assert f.evidence["first_step"] == 0 and f.evidence["layers_affected"] == 1
    assert "bad (Poisoned)" in f.explanation and "NaN" in f.explanation
    for stat in ("act_mean", "act_std", "act_rms", "act_absmax"):
        assert stat in f.explanation
    assert "loss stayed finite" in f.explanation


def test_missing_values_are_not_non_finite(hidden_nan):
    """The frozen first layer has no gradient norm, the unused layer no activations or gradients:
    NaN in the tables, but nothing was measured there."""
    cells = non_finite_cells(hidden_nan)["layers"]
    flagged = set(hidden_nan.layers.layer[cells.any(axis=1).to_numpy()])
    assert flagged == {"bad"}
    assert hidden_nan.layers[hidden_nan.layers.layer == "unused"].act_mean.isna().all()
    assert hidden_nan.layers[hidden_nan.layers.layer == "a"].grad_norm.isna().all()


def test_a_healthy_run_has_no_non_finite_finding(tmp_path):
    from gradscope.testing import TinyMLP

    torch.manual_seed(0)
    train(TinyMLP(), batches("mlp", 3), run=tmp_path / "ok")
    run = gradscope.load_run(tmp_path / "ok")
    assert not non_finite(run)
    assert not any(m.to_numpy().any() for m in non_finite_cells(run).values())


def test_poisoned_gradients_name_the_source_first(tmp_path):
    """Every element NaN: the layer's parameter gradients go NaN too, then the layer before it
    gets NaN gradients and both get NaN weights; the layer whose output broke is named first."""
    run = record(tmp_path / "all", everywhere=True)
    [f] = non_finite(run)
    assert f.layers[0] == "bad" and set(f.layers) == {"a", "bad"}
    assert "global gradient norm is NaN from step 0" in f.explanation
    assert "look first at bad (Poisoned)" in f.explanation


def test_inf_is_reported_as_inf(tmp_path):
    run = record(tmp_path / "inf", value=float("inf"))
    [f] = non_finite(run)
    assert f.layers == ["bad"] and "inf" in f.explanation


def test_inspect_prints_nan_for_measured_and_dash_for_missing(hidden_nan):
    text = run_summary(hidden_nan, limit=None)
    rows = {line.split()[1]: line.split()[3:] for line in text.splitlines()
            if re.match(r"\s+(\d+|<NA>)\s+(a|bad|out|unused)\s", line)}
    act_std, grad_out_rms, grad_norm, update_ratio = rows["bad"]
    assert act_std == "nan" and grad_out_rms not in ("nan", "-")
    assert rows["a"][2] == "-"  # frozen: no gradient norm recorded
    assert rows["unused"][0] == "-" and rows["unused"][1] == "-"  # never called


def test_the_report_shows_the_finding_and_what_its_figures_leave_out(hidden_nan, tmp_path):
    page = html.unescape(reports.build([hidden_nan], tmp_path / "r.html").read_text())
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))
    assert "critical" in text and "Non-finite values (NaN or inf) from step 0" in text
    assert "bad (Poisoned)" in text
    activations = page[page.index('id="activations"'):]
    note = re.search(r'<p class="note">(.*?)</p>', activations[:activations.index("<figure>")], re.S)
    assert note and "left out of these figures" in note.group(1) and "act_std of layer bad" in note.group(1)
