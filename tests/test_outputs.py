"""Which tensor of a module's output is measured, module selection, and the eval phase."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import pytest
import torch
from torch import nn

import gradscope
from gradscope.recording.probes import first_float_tensor


@dataclasses.dataclass
class Out:
    ids: torch.Tensor
    hidden: torch.Tensor


Pair = namedtuple("Pair", "mask value")


class Wrapped(nn.Module):
    """Returns its Linear output packed in the container given."""

    def __init__(self, pack):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.pack = pack

    def forward(self, x):
        return self.pack(self.lin(x))


PACKS = {
    "tuple": lambda y: (y.argmax(-1), y, y * 2),
    "list": lambda y: [torch.ones(2, dtype=torch.bool), y],
    "dict": lambda y: {"index": y.argmax(-1), "logits": y, "other": y + 1},
    "dataclass": lambda y: Out(ids=y.argmax(-1), hidden=y),
    "namedtuple": lambda y: Pair(mask=y > 0, value=y),
    "nested": lambda y: ({"a": [y.long(), (y,)]},),
}


@pytest.mark.parametrize("kind", sorted(PACKS))
def test_first_floating_tensor_is_measured(kind, run_dir):
    torch.manual_seed(0)
    outer = nn.Sequential(Wrapped(PACKS[kind]))
    x = torch.randn(16, 4)
    with gradscope.watch(outer, run_dir, modules=["0"]) as rec:
        out = outer(x)
        y = first_float_tensor(out)
        y.sum().backward()
        rec.step()
    expected = outer[0].lin(x).detach()
    row = gradscope.load_run(run_dir).layers.set_index("layer").loc["0"]
    assert row["act_std"] == pytest.approx(float(expected.std(unbiased=False)), rel=1e-5)
    assert row["grad_out_norm"] == pytest.approx(8.0, rel=1e-6)  # d(sum)/dy = 1 on 16x4 values


def test_integer_and_boolean_outputs_are_skipped(run_dir):
    class Argmax(nn.Module):
        def forward(self, x):
            return x.argmax(-1), x > 0

    model = nn.Sequential(nn.Linear(4, 4), Argmax())
    with gradscope.watch(model, run_dir, modules=["0", "1"]) as rec:
        model(torch.randn(3, 4))
        rec.step()
    run = gradscope.load_run(run_dir)
    assert set(run.layers.layer) == {"0"}
    table = run.layer_table.set_index("name")
    assert table.loc["1", "depth"] != table.loc["1", "depth"]  # NaN: never measured


def test_eval_phase_under_no_grad_and_eval_mode(run_dir):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(5, 4)
    with gradscope.watch(model, run_dir) as rec:
        model(x).sum().backward()
        with torch.no_grad():
            model(x)  # training mode but no grad: eval phase
        rec.step()
        model.eval()
        model(x)  # eval mode with grad enabled: still eval phase, no gradient hook
        model.train()
        rec.step()
    layers = gradscope.load_run(run_dir).layers
    by = layers.groupby(["step", "phase"]).size().to_dict()
    # step 1 had no training forward: its train rows carry only the parameter norms of step()
    assert by == {(0, "train"): 2, (0, "eval"): 2, (1, "train"): 2, (1, "eval"): 2}
    step1 = layers[(layers.step == 1) & (layers.phase == "train")]
    assert step1.act_std.isna().all() and step1.grad_out_norm.isna().all() and step1.param_norm.notna().all()
    ev = layers[layers.phase == "eval"]
    assert ev.grad_out_norm.isna().all() and ev.param_norm.isna().all()
    assert ev.act_std.notna().all()


def test_module_selection_by_glob_type_predicate_and_list(run_dir, tmp_path):
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 2))

    def names(**kw):
        path = tmp_path / str(len(list(tmp_path.iterdir())))
        with gradscope.watch(model, path, **kw) as rec:
            return [layer.name for layer in rec.layers]

    assert names() == ["0", "2.0", "3"]  # default: leaf modules that own parameters
    assert names(modules="2.*") == ["2.0", "2.1"]
    assert names(modules=nn.Tanh) == ["2.1"]
    assert names(modules=lambda n, m: isinstance(m, nn.Sequential)) == ["", "2"]
    assert names(modules=["0", nn.ReLU]) == ["0", "1"]


def test_layer_table_in_execution_order(run_dir):
    class Reordered(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Linear(4, 2)  # registered first, runs last
            self.early = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.late(self.early(x))

    model = Reordered()
    with gradscope.watch(model, run_dir) as rec:
        model(torch.randn(2, 4)).sum().backward()
        rec.step()
    run = gradscope.load_run(run_dir)
    table = run.layer_table.set_index("name")
    assert table.loc["early", "depth"] == 0 and table.loc["late", "depth"] == 1
    assert table.loc["late", "rel_depth"] == 1.0
    assert table.loc["unused"].isna()["depth"]
    assert table.loc["early", "params"] == 20 and table.loc["late", "type"] == "Linear"
    # rows follow execution order; the unused layer still reports its parameter norm, last
    assert list(run.layers.layer) == ["early", "late", "unused"]
    unused = run.layers.set_index("layer").loc["unused"]
    assert unused[["act_std", "grad_norm", "grad_out_norm"]].isna().all() and unused["param_norm"] > 0
