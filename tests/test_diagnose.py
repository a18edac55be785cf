"""Findings: each rule fires on data that shows the phenomenon and stays silent on healthy data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope import diagnose
from gradscope.analysis.findings import gradient_fit
from gradscope.lab.train import train
from gradscope.store import BLOCK_SCHEMA, LAYER_SCHEMA, Run


def codes(findings, run=None):
    return {f.code for f in findings if run is None or f.run == run}


@pytest.fixture(scope="module")
def sigmoid_runs(tmp_path_factory):
    """A small version of the sigmoid preset: 20-layer MLPs, a few steps."""
    out = tmp_path_factory.mktemp("sigmoid")
    specs = [("mlp_plain", "sigmoid-plain", "sigmoid"), ("mlp_residual", "sigmoid-residual", "sigmoid"),
             ("mlp_plain", "relu-plain", "relu")]
    for model, name, act in specs:
        train(model, steps=3, every=1, out=out, run_name=name, batch_size=32, progress=False,
              overrides={"depth": 20, "width": 32, "activation": act}, watch_activations=True)
    return {name: gradscope.load_run(out / name) for _, name, _ in specs}


def test_deep_sigmoid_mlp_vanishes_and_its_residual_twin_does_not(sigmoid_runs):
    found = diagnose(list(sigmoid_runs.values()))
    assert "vanishing_gradient" in codes(found, "sigmoid-plain")
    assert "vanishing_gradient" not in codes(found, "sigmoid-residual")
    assert "vanishing_gradient" not in codes(found, "relu-plain")  # healthy: He init, ReLU
    f = next(f for f in found if f.code == "vanishing_gradient")
    assert f.evidence["per_layer_factor"] < 0.5 and f.evidence["first_over_last"] < 1e-6
    assert "multiplied by" in f.explanation


def test_gradient_is_judged_through_the_hidden_stack(sigmoid_runs):
    """The fit runs over the hidden layers (the head left out), so the residual twin's large
    output-layer gradient does not decide the verdict; its hidden stack is about flat."""
    run = sigmoid_runs["sigmoid-residual"]
    fit = gradient_fit(run.layers[run.layers.phase == "train"], 0)
    hidden = run.layers[(run.layers.phase == "train") & (run.layers.step == 0)].dropna(subset=["depth"])
    assert fit.layers == len(hidden) - 1
    assert 0.1 < fit.span < 10, fit


def test_at_init_plain56_explodes_toward_the_input_and_resnet56_does_not(init_runs_56):
    found = diagnose([init_runs_56["plain56"], init_runs_56["resnet56"]])
    explode = [f for f in found if f.code == "exploding_gradient"]
    assert [f.run for f in explode] == ["plain56"]
    assert explode[0].evidence["first_over_last"] > 1e3 and "not a vanishing gradient" in explode[0].explanation
    assert "vanishing_gradient" not in codes(found)


@pytest.mark.slow
def test_transformers_without_residuals_collapse_their_tokens(tmp_path):
    cos = {}
    for norm in ("none", "post", "pre"):
        r = train(f"transformer_lm_{norm}", steps=2, every=1, out=tmp_path, batch_size=16, progress=False,
                  overrides={"depth": 6, "seq_len": 16})
        run = gradscope.load_run(r.run)
        last = run.blocks[run.blocks.step == 0].sort_values("depth").token_cos.iloc[-2:]
        cos[norm] = float(last.mean())
        cos[norm + "_findings"] = codes(diagnose(run))
    assert cos["none"] > cos["post"] + 0.1 and cos["none"] > cos["pre"] + 0.1, cos
    assert "rank_collapse" in cos["none_findings"]
    assert "rank_collapse" not in cos["pre_findings"]


def test_dead_and_saturated_units(tmp_path):
    dead = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    sat = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 2))
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)
        sat[0].weight.mul_(50)
    for name, model in (("dead", dead), ("sat", sat)):
        with gradscope.watch(model, tmp_path / name, modules=[nn.Linear, nn.ReLU, nn.Sigmoid]) as rec:
            model(torch.randn(32, 8)).sum().backward()
            rec.step()
    found = diagnose([tmp_path / "dead", tmp_path / "sat"])
    assert "dead_units" in codes(found, "dead") and "dead_units" not in codes(found, "sat")
    assert "saturated_units" in codes(found, "sat") and "saturated_units" not in codes(found, "dead")
    f = next(f for f in found if f.code == "dead_units")
    assert f.layers == ["1"] and f.evidence["max_zero_fraction"] == 1.0


def test_non_finite_values_are_critical(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with gradscope.watch(model, tmp_path / "r") as rec:
        for scale in (1.0, float("inf")):
            (model(torch.randn(3, 4)).sum() * scale).backward()
            rec.step(loss=torch.tensor(scale))
    found = diagnose(tmp_path / "r")
    assert found[0].severity == "critical" and found[0].code == "non_finite" and found[0].steps == [1]


def test_update_ratio_and_identity_rules(tmp_path):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            nn.init.zeros_(self.lin.weight)
            nn.init.zeros_(self.lin.bias)

        def forward(self, x):
            return x + self.lin(x)

    model = nn.Sequential(nn.Linear(8, 8), Block(), Block(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=100.0)  # far too large
    with gradscope.watch(model, tmp_path / "r", optimizer=opt):
        F.cross_entropy(model(torch.randn(16, 8)), torch.randint(0, 2, (16,))).backward()
        opt.step()
    found = codes(diagnose(tmp_path / "r"))
    assert {"update_ratio_high", "near_identity_blocks"} <= found
    assert "update_ratio_low" not in found and "far_from_identity_blocks" not in found


def fake_run(name: str, depth: int, residual: bool, losses: list[float]) -> Run:
    steps = list(range(len(losses)))
    return Run(
        path=Path(name), meta={"model": {"class": "CifarResNet", "depth": depth}, "task": {"name": "images"}},
        layers=pd.DataFrame({c: pd.Series(dtype=t) for c, t in {**LAYER_SCHEMA, "depth": "float64"}.items()}),
        blocks=pd.DataFrame({c: pd.Series(dtype=t) for c, t in {**BLOCK_SCHEMA, "depth": "float64"}.items()}),
        scalars=pd.DataFrame({"step": steps, "loss": losses, "accuracy": 0.5, "lr": 0.1, "grad_global_norm": 1.0}),
        layer_table=pd.DataFrame(), block_table=pd.DataFrame({"residual": [residual] * 3}))


def test_degradation_needs_the_deeper_plain_net_to_train_worse():
    runs = [fake_run("plain20", 20, False, [2.0, 1.0, 0.50]), fake_run("plain56", 56, False, [2.0, 1.5, 0.90]),
            fake_run("resnet20", 20, True, [2.0, 1.0, 0.50]), fake_run("resnet56", 56, True, [2.0, 0.9, 0.40])]
    found = [f for f in diagnose(runs) if f.code == "degradation"]
    assert len(found) == 1
    text = found[0].explanation
    assert "plain56 (56 layers)" in text and "residual twins do not" in text
    assert "without vanishing gradient" in text
    healthy = [fake_run("plain20", 20, False, [2.0, 1.0, 0.5]), fake_run("plain56", 56, False, [2.0, 1.0, 0.48])]
    assert not [f for f in diagnose(healthy) if f.code == "degradation"]
    # nearly fitted residual twins (as measured on a GPU: 0.0063 vs 0.0163) do not count as degrading
    fitted = runs[:2] + [fake_run("resnet20", 20, True, [2.0, 0.1, 0.0063]),
                         fake_run("resnet56", 56, True, [2.0, 0.2, 0.0163])]
    assert "residual twins do not" in next(f for f in diagnose(fitted) if f.code == "degradation").explanation
    both = runs[:2] + [fake_run("resnet20", 20, True, [2.0, 1.0, 0.05]),
                       fake_run("resnet56", 56, True, [2.0, 1.8, 1.5])]
    assert "residual twins degrade too" in next(f for f in diagnose(both) if f.code == "degradation").explanation


@pytest.mark.slow
def test_findings_head_the_report_and_inspect(sigmoid_runs, tmp_path):
    from click.testing import CliRunner
    from gradscope.cli.main import main

    from gradscope import reports

    page = reports.build(list(sigmoid_runs.values()), tmp_path / "r.html").read_text()
    assert page.index('id="findings"') < page.index('id="summary"')
    assert "sigmoid-plain: Vanishing gradient toward the input" in page
    shown = CliRunner().invoke(main, ["inspect", str(sigmoid_runs["sigmoid-plain"].path)])
    assert shown.exit_code == 0 and "[warning] sigmoid-plain: Vanishing gradient toward the input" in shown.output


@pytest.mark.parametrize("preset", [pytest.param("pair", marks=pytest.mark.slow),
                                    pytest.param("degradation", marks=pytest.mark.slow), "sigmoid",
                                    pytest.param("transformer", marks=pytest.mark.slow)])
def test_every_preset_runs_in_a_small_version(preset, tmp_path):
    from gradscope.lab.presets import PRESETS, run_preset

    results = run_preset(preset, tmp_path, quick=True, steps=2, progress=False)
    assert [r.run.name for r in results] == [r.run_name for r in PRESETS[preset].runs]
    assert all(gradscope.load_run(r.run).status == "finished" for r in results)
    if preset == "degradation":  # on the CPU: the smaller problem that 2,000 steps can afford
        meta = gradscope.load_run(results[0].run).meta
        assert meta["task"]["options"] == {"size": 16} and meta["recipe"]["batch_size"] == 32
