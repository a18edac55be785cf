"""muP's coordinate check: a standard-parameterisation MLP trained with Adam has a readout whose
activations grow with width once training starts; a 1/width-scaled readout does not."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from gradscope.cli.main import main
from torch import nn

import gradscope
from gradscope import reports
from gradscope.analysis.coord import width_slopes

WIDTHS = [64, 128, 256, 512]


class Readout(nn.Linear):
    """muP's readout: its input divided by the width multiplier (base width 64)."""

    def forward(self, x):
        return super().forward(x * (64 / self.in_features))


def _mlp(scaled: bool):
    return lambda w: nn.Sequential(nn.Linear(32, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                                   (Readout if scaled else nn.Linear)(w, 10))


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
    out = tmp_path_factory.mktemp("coord")
    adam = lambda params: torch.optim.Adam(params, lr=3e-3)  # noqa: E731
    return {name: gradscope.coord_check(_mlp(name == "mup_readout"), WIDTHS, _batch, steps=4, out=out, name=name,
                                        optimizer=adam)
            for name in ("standard", "mup_readout")}


def test_the_standard_readout_grows_with_width_and_the_scaled_one_does_not(checks):
    standard, scaled = checks["standard"], checks["mup_readout"]
    assert [r.meta["coord_check"]["width"] for r in standard.runs] == WIDTHS
    readout = standard.slopes[(standard.slopes.layer == "4") & (standard.slopes.step >= 1)]
    assert readout.slope.max() > 0.5  # about width^0.7 after one Adam step
    assert "4" in [f["layer"] for f in standard.growing[0]["layers"]]
    (finding,) = [f for f in standard.findings if f.code == "width_growth"]
    assert "4" in finding.layers and finding.severity == "warning"
    scaled_readout = scaled.slopes[(scaled.slopes.layer == "4") & (scaled.slopes.step >= 1)]
    assert scaled_readout.slope.max() < 0.25
    assert "4" not in [f["layer"] for f in scaled.growing[0]["layers"]]
    assert all("4" not in f.layers for f in scaled.findings if f.code == "width_growth")


def test_the_report_draws_the_coordinate_check(checks, tmp_path):
    page = reports.build(checks["standard"].runs, tmp_path / "r.html").read_text()
    section = page[page.index('<h2 id="coord-check">'):]
    section = section[:section.index("<h2 ", 10)] if "<h2 " in section[10:] else section
    assert section.count('<img src="data:image/png;base64,') == 1
    assert "Activations grow with width" in page


def test_slopes_are_the_exponent_of_width():
    widths = np.array([64, 128, 256, 512])
    table = pd.DataFrame({"group": "g", "width": widths, "step": 1, "layer": "a", "rel_depth": 0.0,
                          "act_rms": 3 * widths ** 0.5})
    assert width_slopes(table).slope.tolist() == pytest.approx([0.5])


def test_coord_check_command(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["coord-check", "mlp_plain", "--widths", "16,32", "--steps", "2", "--set", "depth=3",
                                  "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert "act_rms ~ width^" in result.output and (tmp_path / "c" / "report.html").exists()
    assert 'id="coord-check"' in (tmp_path / "c" / "report.html").read_text()
    for bad, words in ((["--widths", "16,x"], "comma-separated integers"), (["--widths", "16"], "two different"),
                       (["--steps", "1"], "--steps")):
        out = runner.invoke(main, ["coord-check", "mlp_plain", *bad, "--out", str(tmp_path / "bad")])
        assert out.exit_code == 2 and words in out.output and "Traceback" not in out.output
    resnet = runner.invoke(main, ["coord-check", "resnet20", "--out", str(tmp_path / "r")])
    assert resnet.exit_code == 2 and "has no width setting" in resnet.output
