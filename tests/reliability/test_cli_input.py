"""The CLI checks everything it can before it trains or writes, and ends quietly on a closed pipe.

Issue 18, item 7 and the broken-pipe half of item 9. tests/test_cli.py covers typos, unknown
settings and tasks, one model's existing run and an unwritable output; these cover what used to
surface only after the first of several models had trained, non-finite numbers, arguments that a
shell glob adds to ``report``, and ``| head``.
"""

from __future__ import annotations

import errno
import math
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from gradscope.cli.main import main

from gradscope.lab.train import train
from gradscope.testing import TinyMLP, batches
from gradscope.testing import train as train_tiny


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders land here, not in the checkout
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def assert_refused(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.mark.parametrize("value", ["nan", "inf", "NaN", "+Infinity"])
def test_non_finite_lr_is_refused_before_anything_is_written(cli, tmp_path, value):
    out = tmp_path / "runs"
    assert_refused(cli("run", "mlp_plain", "--lr", value, "--steps", "1", "--out", out), "--lr", "finite")
    assert not out.exists()


@pytest.mark.parametrize("option, value", [("lr", math.nan), ("lr", math.inf), ("lr", 0.0), ("lr", -0.1),
                                           ("lr", "0.1"), ("batch_size", 0), ("eval_every", 0),
                                           ("attribution_every", 0), ("eval_limit", 0), ("steps", 2.5)])
def test_train_refuses_bad_numbers_before_creating_the_run(tmp_path, option, value):
    with pytest.raises(ValueError, match=option):
        train("mlp_plain", out=tmp_path / "runs", progress=False, **{"steps": 1, option: value})
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, message", [
    (["mlp_plain", "resnet20", "--set", "depth=3"], "resnet20"),  # resnet depth must be 6n+2
    (["mlp_plain", "transformer_lm_pre", "--task", "images"], "is for image models"),
    (["mlp_plain", "resnet20", "--set", "width=16"], "resnet20 has no setting width"),
])
def test_every_model_is_checked_before_the_first_trains(cli, tmp_path, args, message):
    out = tmp_path / "runs"
    assert_refused(cli("run", *args, "--steps", "1", "--out", out, "--no-progress"), message)
    assert not out.exists()  # mlp_plain did not train first


@pytest.mark.parametrize("args, message", [(["--device", "tpu"], "device must be"),
                                           (["--device", "cpu", "--amp"], "AMP")])
def test_device_and_amp_are_checked_before_the_output_folder_is_made(cli, tmp_path, args, message):
    out = tmp_path / "runs"
    assert_refused(cli("run", "mlp_plain", *args, "--steps", "1", "--out", out), message)
    assert not out.exists()


def test_a_model_named_twice_is_refused(cli, tmp_path):
    out = tmp_path / "runs"
    result = cli("run", "mlp_plain", "mlp_residual", "mlp_plain", "--overwrite", "--steps", "1", "--out", out)
    assert_refused(result, "mlp_plain named more than once")
    assert not out.exists()


def test_an_existing_run_of_a_later_model_is_refused_before_the_first_trains(cli, tmp_path):
    out = tmp_path / "runs"
    (out / "mlp_residual").mkdir(parents=True)
    (out / "mlp_residual" / "meta.json").write_text("{}")
    result = cli("run", "mlp_plain", "mlp_residual", "--steps", "1", "--out", out, "--no-progress")
    assert_refused(result, str(out / "mlp_residual"), "--overwrite")
    assert not (out / "mlp_plain").exists()


def test_overwrite_of_a_later_folder_that_is_not_a_run_is_refused_before_the_first_trains(cli, tmp_path):
    out = tmp_path / "runs"
    (out / "mlp_residual" / "scalars").mkdir(parents=True)
    (out / "mlp_residual" / "scalars" / "notes.csv").write_text("mine")
    result = cli("run", "mlp_plain", "mlp_residual", "--steps", "1", "--out", out, "--no-progress", "--overwrite")
    assert_refused(result, str(out / "mlp_residual"), "no gradscope meta.json")
    assert not (out / "mlp_plain").exists()
    assert (out / "mlp_residual" / "scalars" / "notes.csv").read_text() == "mine"


@pytest.fixture
def fake_build(monkeypatch):
    """reports.build replaced by a stub that notes the runs it is given (the real one takes
    seconds of plotting, which tests/test_reports.py pays for)."""
    from gradscope import reports

    given = []

    def build(runs, out, title=None):
        given.extend(runs)
        out.write_text("<html></html>")
        return out

    monkeypatch.setattr(reports, "build", build)
    return given


def test_report_skips_files_a_glob_adds_and_says_so(cli, tmp_path, fake_build):
    folder = tmp_path / "cmp"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
    (folder / "report.html").write_text("an earlier report")
    typo = tmp_path / "typo"  # not there: passed on, for load_run to name it
    result = cli("report", *sorted(folder.iterdir()), typo, "-o", folder / "report.html")  # runs/cmp/* -o ...
    assert result.exit_code == 0, result.output
    assert fake_build == [folder / "a", folder / "b", typo]
    assert f"skipping {folder / 'report.html'}" in result.stderr


def test_report_of_files_only_is_refused(cli, tmp_path, fake_build):
    (tmp_path / "report.html").write_text("an earlier report")
    assert_refused(cli("report", tmp_path / "report.html"), "no run directory")
    assert not fake_build


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe") / "run"
    train_tiny(TinyMLP(), batches("mlp", steps=2), run=path)
    return path


def test_a_closed_pipe_ends_quietly(tiny_run):
    """``gradscope inspect run | head -1``: here the reader is gone before the output is written."""
    proc = subprocess.Popen([sys.executable, "-m", "gradscope.cli.main", "inspect", str(tiny_run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # no reader: the first write meets EPIPE
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1  # click's and Python's exit code for EPIPE
    for noise in ("Error", "Traceback", "Broken pipe", "BrokenPipeError", "Exception ignored"):
        assert noise not in stderr, stderr


@pytest.mark.parametrize("command", ["models", "inspect", "report"])
def test_every_command_ends_quietly_on_a_closed_pipe(cli, tmp_path, tiny_run, fake_build, monkeypatch, command):
    def closed(*args, **kwargs):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(click, "echo", closed)
    args = {"models": [], "inspect": [tiny_run], "report": [tiny_run, "-o", tmp_path / "r.html"]}[command]
    result = cli(command, *args)
    assert result.exit_code == 1 and "Broken pipe" not in result.output, result.output
