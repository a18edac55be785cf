"""Findings as a gate: ``gradscope check`` exit codes and ``gradscope.testing.assert_healthy``.
A 20-layer sigmoid MLP's gradient vanishes toward the input; its residual twin's does not."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from gradscope.cli.main import main

from gradscope import models
from gradscope.testing import assert_healthy, assert_no_hooks

SIGMOID_20 = ("--set", "activation=sigmoid", "--set", "depth=20")


def _batches(name: str):
    return lambda step: models.example_input(name, batch=32, seed=step, activation="sigmoid", depth=20)


@pytest.mark.parametrize("name, healthy", [("mlp_plain", False), ("mlp_residual", True)])
def test_assert_healthy(name, healthy):
    torch.manual_seed(0)
    model = models.create(name, activation="sigmoid", depth=20)
    before = [p.detach().clone() for p in model.parameters()]
    if healthy:
        findings = assert_healthy(model, _batches(name), steps=10)
        assert all(f.severity == "info" for f in findings)
    else:
        with pytest.raises(AssertionError, match="Vanishing gradient toward the input"):
            assert_healthy(model, _batches(name), steps=10)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # a copy was trained
    assert_no_hooks(model)


def test_assert_healthy_refuses_a_bad_level():
    with pytest.raises(ValueError, match="severity must be one of"):
        assert_healthy(models.create("mlp_plain"), _batches("mlp_plain"), fail_on="fatal")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    out = tmp_path_factory.mktemp("check")
    result = CliRunner().invoke(main, ["run", "mlp_plain", "mlp_residual", *SIGMOID_20, "--steps", "10",
                                       "--every", "5", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def test_check_exit_codes(recorded):
    runner = CliRunner()
    plain = runner.invoke(main, ["check", str(recorded / "mlp_plain")])
    assert plain.exit_code == 1 and "Vanishing gradient" in plain.output and "at warning or above" in plain.output
    residual = runner.invoke(main, ["check", str(recorded / "mlp_residual")])
    assert residual.exit_code == 0 and "healthy" in residual.output
    assert runner.invoke(main, ["check", str(recorded / "mlp_plain"), "--fail-on", "critical"]).exit_code == 0
    missing = runner.invoke(main, ["check", str(recorded / "nope")])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert runner.invoke(main, ["check", str(recorded / "mlp_plain"), "--fail-on", "info"]).exit_code == 2


def test_check_json(recorded):
    result = CliRunner().invoke(main, ["check", str(recorded / "mlp_plain"), str(recorded / "mlp_residual"),
                                       "--json"])
    assert result.exit_code == 1
    out = json.loads(result.output)
    assert out["failed"] is True and out["fail_on"] == "warning"
    vanishing = [f for f in out["findings"] if f["code"] == "vanishing_gradient"]
    assert vanishing and vanishing[0]["run"] == "mlp_plain" and vanishing[0]["severity"] == "warning"
