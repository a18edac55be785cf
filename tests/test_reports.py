"""HTML reports: figure functions on small frames, a self-contained page, escaping, and a real browser."""

from __future__ import annotations

import html.parser
import json
import os
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from gradscope.reports import figures
from matplotlib.figure import Figure
from torch import nn

import gradscope
from gradscope import reports
from gradscope.lab.train import train
from gradscope.store import RunError


def layers_frame(runs=("a", "b"), steps=(0, 5, 10), depth=4):
    rows = []
    for r, run in enumerate(runs):
        n = depth + 2 * r  # runs of different depth
        for step in steps:
            for d in range(n):
                rows.append({"run": run, "step": step, "layer": f"l{d}", "depth": d, "rel_depth": d / (n - 1),
                             "type": "BatchNorm2d" if d % 2 else "Conv2d", "act_std": 1.0 + d / 10,
                             "grad_out_rms": 10.0 ** (-d), "grad_norm": 0.1 * (d + 1)})
    return pd.DataFrame(rows)


def blocks_frame():
    rows = [{"run": run, "step": step, "block": f"b{i}", "rel_depth": i / 2, "id_rel_residual": 0.5 + i,
             "id_cos": 0.9, "id_grad_ratio": 1.1, "branch_ratio": 0.4, "token_cos": np.nan}
            for run in ("a", "b") for step in (0, 1) for i in range(3)]
    return pd.DataFrame(rows)


def lines_of(fig: Figure) -> int:
    return sum(len(ax.get_lines()) for ax in fig.axes)


def test_training_curves_has_loss_on_log_scale():
    scalars = pd.DataFrame({"run": ["a"] * 3 + ["b"] * 3, "step": [0, 1, 2] * 2, "loss": [2, 1, 0.5, 2, 1.5, 1],
                            "accuracy": [0.1, 0.5, 0.7] * 2, "eval_accuracy": [np.nan, np.nan, 0.6] * 2})
    fig = figures.training_curves(scalars)
    assert fig.axes[0].get_yscale() == "log" and lines_of(fig) >= 4


def test_gradient_flow_panels_at_first_middle_last_step():
    fig = figures.gradient_flow(layers_frame(), "grad_out_rms")
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert titles == ["first recorded step", "middle recorded step", "last recorded step"]
    assert all(ax.get_yscale() == "log" for ax in fig.axes[:3])
    xs = fig.axes[2].get_lines()[0].get_xdata()
    assert min(xs) == 0 and max(xs) == 1  # aligned on relative depth


def test_heatmap_downsamples_steps_to_200_columns():
    frame = layers_frame(runs=("a",), steps=tuple(range(0, 1000, 2)))
    assert len(figures.downsample_steps(frame.step.to_numpy())) == 200
    fig = figures.layer_step_heatmap(frame)
    mesh = fig.axes[0].collections[0]
    assert mesh.get_array().shape[-1] == 200 or mesh.get_array().size == 4 * 200


def test_activation_std_prefers_normalisation_layers_and_sorts():
    fig = figures.activation_std_by_depth(layers_frame())
    order, sorted_ = fig.axes[0].get_lines()[0], fig.axes[1].get_lines()[0]
    assert len(order.get_ydata()) == 2  # only the BatchNorm rows of run "a"
    assert list(sorted_.get_ydata()) == sorted(sorted_.get_ydata(), reverse=True)


def test_attribution_figure_first_and_last_checkpoint():
    frame = pd.DataFrame({"run": ["a"] * 4 + ["b"] * 2, "step": [0, 0, 10, 10, 0, 0],
                          "rel_depth": [0.0, 1.0] * 3, "attr_abs": [1.0, 2.0, 3.0, 4.0, 0.5, 0.0],
                          "branch_share": [0.2, 0.4, 0.3, 0.5, 1.0, 1.0]})
    fig = figures.attribution_by_depth(frame, "attr_abs", "|attribution|", log=True)
    first, last = fig.axes[:2]
    assert first.get_title().endswith("(step 0)") and last.get_title().endswith("(step 0, 10)")  # run b stopped at 0
    assert first.get_yscale() == "log" and len(last.get_lines()) >= 1
    assert lines_of(figures.attribution_by_depth(frame, "branch_share", "branch share", log=False)) >= 3
    assert isinstance(figures.attribution_by_depth(frame.iloc[0:0], "attr_abs", "x", log=True), Figure)


def test_identity_figures_and_empty_inputs():
    assert lines_of(figures.identity_by_depth(blocks_frame())) >= 6
    assert lines_of(figures.identity_over_training(blocks_frame())) >= 4
    empty = blocks_frame().iloc[0:0]
    assert isinstance(figures.identity_by_depth(empty), Figure)
    no_steps = pd.DataFrame(columns=["run", "step", "loss", "accuracy", "eval_accuracy"])
    assert isinstance(figures.training_curves(no_steps), Figure)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    for name, depth in (("mlp_plain", 4), ("mlp_residual", 7)):
        train(name, steps=8, every=2, out=out, overrides={"depth": depth, "width": 16}, batch_size=16,
              progress=False, attribution_every=4)
    return out


class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    parser = Tags()
    parser.feed(path.read_text())
    return parser


@pytest.mark.slow
def test_report_is_one_self_contained_file(two_runs, tmp_path):
    out = reports.build([two_runs / "mlp_plain", two_runs / "mlp_residual"], tmp_path / "r.html", title="cmp")
    page = parse(out)
    tags = [t for t, _ in page.tags]
    assert "script" not in tags and "link" not in tags
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            value = attrs.get(key) or ""
            assert not value.startswith(("http:", "https:", "//")), (tag, attrs)
    images = [a for t, a in page.tags if t == "img"]
    assert len(images) >= 9 and all(a["src"].startswith("data:image/png;base64,") and a["alt"] for a in images)
    text = " ".join(page.text)
    for section in ("Summary", "Loss and accuracy", "Gradient flow by depth", "Layers over training",
                    "Activation statistics by depth", "Identity closeness", "Attribution flow",
                    "carried by the residual branch"):
        assert section in text
    assert "mlp_plain" in text and "mlp_residual" in text
    assert text.count("Look for") + text.count("Compare") + text.count("Each row") >= 3  # captions


@pytest.mark.slow
def test_names_are_escaped(two_runs, tmp_path):
    evil = tmp_path / "<img src=x onerror=alert(1)>"
    shutil.copytree(two_runs / "mlp_plain", evil)
    meta = json.loads((evil / "meta.json").read_text())
    meta["model"]["registry_name"] = "<script>alert(1)</script>"
    (evil / "meta.json").write_text(json.dumps(meta))
    out = reports.build([evil], tmp_path / "r.html", title="<script>alert(1)</script>")
    raw = out.read_text()
    assert "<script>" not in raw and "<img src=x" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "&lt;img src=x onerror=alert(1)&gt;" in raw


@pytest.mark.slow
def test_running_and_non_finite_runs_render_with_a_note(two_runs, tmp_path):
    running = tmp_path / "running"
    shutil.copytree(two_runs / "mlp_plain", running)
    meta = json.loads((running / "meta.json").read_text())
    meta["status"] = "running"
    (running / "meta.json").write_text(json.dumps(meta))
    from gradscope.testing import TinyMLP

    model = TinyMLP()
    with gradscope.watch(model, tmp_path / "diverged") as rec:
        for scale in (1.0, float("inf")):
            (model(torch.randn(4, 8)).sum() * scale).backward()
            rec.step(loss=torch.tensor(scale))
    out = reports.build([running, tmp_path / "diverged"], tmp_path / "r.html")
    # meta.json says running, and no writer holds the copy: its status reads interrupted
    notes = [n for n in parse(out).text if "status is 'interrupted'" in n or "non-finite" in n or "NaN or inf" in n]
    assert any("interrupted" in n for n in notes) and any("inf" in n for n in notes)


def test_unreadable_run_is_named(tmp_path):
    with pytest.raises(RunError, match="nowhere"):
        reports.build([tmp_path / "nowhere"], tmp_path / "r.html")


@pytest.mark.slow
def test_report_and_demo_commands(two_runs, tmp_path):
    from click.testing import CliRunner
    from gradscope.cli.main import main

    runner = CliRunner()
    result = runner.invoke(main, ["report", str(two_runs / "mlp_plain"), str(two_runs / "mlp_residual"),
                                  "-o", str(tmp_path / "x.html"), "--title", "T"])
    assert result.exit_code == 0 and (tmp_path / "x.html").exists() and "x.html" in result.output
    bad = runner.invoke(main, ["report", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "missing" in bad.output
    demo = runner.invoke(main, ["demo", "--quick", "--steps", "2", "--out", str(tmp_path / "demo"), "--no-progress"])
    assert demo.exit_code == 0 and (tmp_path / "demo" / "report.html").exists()
    assert "report.html" in demo.output
    for name in ("plain20", "resnet20"):  # the demo end to end (one demo run serves both checks)
        assert gradscope.load_run(tmp_path / "demo" / name).status == "finished"
        assert f"model {name}" in demo.output
    # the flagship report has every section: the demo records attribution, so its section has figures
    page = (tmp_path / "demo" / "report.html").read_text()
    attribution = page[page.index('<h2 id="attribution">'):]
    assert attribution.count('<img src="data:image/png;base64,') == 2
    assert "No attribution checkpoints" not in attribution


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def test_report_renders_in_headless_chromium_without_console_errors(two_runs, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (.ci/run does) so the browser test runs")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    out = reports.build([two_runs / "mlp_plain", two_runs / "mlp_residual"], tmp_path / "r.html")
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--window-size=1280,2000", f"--screenshot={shot}", out.as_uri()],
        capture_output=True, text=True, timeout=120)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert shot.exists(), proc.stderr[-2000:]
    assert not console, console
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] >= 1000 and pixels[..., :3].std() > 0.05  # not a blank page


def test_layer_named_like_a_script_shows_as_text(tmp_path):
    model = nn.Sequential()
    model.add_module("lin", nn.Linear(4, 4))
    model.add_module("<script>alert(1)</script>", nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # dead units: the finding lists the layer by name
    with gradscope.watch(model, tmp_path / "run", modules=[nn.Linear, nn.ReLU]) as rec:
        model(torch.randn(8, 4)).sum().backward()
        rec.step()
    raw = reports.build([tmp_path / "run"], tmp_path / "r.html").read_text()
    assert "Dead units" in raw and "<script>" not in raw
    assert "layers &lt;script&gt;alert(1)&lt;/script&gt;" in raw
