"""The gradscope command: every command's help, clear errors with exit code 2, real runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from gradscope.cli.main import main

import gradscope

COMMANDS = ["models", "run", "inspect", "report", "demo"]


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders land here, not in the checkout
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_every_command_has_help(cli, command):
    result = cli(*command, "--help")
    assert result.exit_code == 0 and "Usage:" in result.output


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0 and gradscope.__version__ in result.output


def test_models_lists_depth_parameters_and_blocks(cli):
    result = cli("models", "resnet*")
    assert result.exit_code == 0
    line = next(text for text in result.output.splitlines() if text.startswith("resnet56 "))
    assert "56" in line and "0.85M" in line and " 27 " in line
    assert "plain20" not in result.output
    assert cli("models").output.count("\n") == len(gradscope.models.names()) + 1


@pytest.mark.parametrize("args, message", [
    (["models", "vgg*"], "no reference model matches"),
    (["run", "resnet21"], "did you mean"),
    (["run", "resnet20", "--task", "imagenet"], "unknown task"),
    (["run", "resnet20", "--task", "dyck"], "is for lm models"),
    (["run", "resnet20", "--steps", "0"], "--steps"),
    (["run", "mlp_plain", "--set", "depth"], "KEY=VALUE"),
    (["run", "mlp_plain", "--set", "colour=red"], "no setting colour"),
    (["inspect", "does/not/exist"], "no gradscope run"),
    (["demo", "--steps", "-1"], "--steps"),
])
def test_bad_input_is_one_clear_message_and_exit_code_2(cli, args, message):
    result = cli(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_unwritable_output_is_a_clear_error(cli, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = cli("run", "mlp_plain", "--steps", "1", "--out", blocker / "runs", "--no-progress")
    assert result.exit_code == 2 and "cannot write to" in result.output


def test_run_then_inspect_then_damaged_run(cli, tmp_path):
    result = cli("run", "mlp_plain", "mlp_residual", "--steps", "4", "--every", "2", "--out", tmp_path,
                 "--set", "depth=4", "--set", "width=16", "--batch-size", "16", "--no-progress")
    assert result.exit_code == 0, result.output
    assert "mlp_plain: 4 steps" in result.output and (tmp_path / "mlp_residual" / "meta.json").exists()

    again = cli("run", "mlp_plain", "--steps", "1", "--out", tmp_path, "--no-progress")
    assert again.exit_code == 2 and "--overwrite" in again.output

    shown = cli("inspect", tmp_path / "mlp_plain")
    assert shown.exit_code == 0
    assert "mlp_plain" in shown.output and "blocks.0.branch.1" in shown.output and "act_std" in shown.output
    assert "mean id_rel_residual" in shown.output

    part = next((tmp_path / "mlp_plain" / "layers").glob("part-*.parquet"))
    part.write_bytes(part.read_bytes()[:100])
    broken = cli("inspect", tmp_path / "mlp_plain")
    assert broken.exit_code == 2 and part.name in broken.output and "damaged" in broken.output


@pytest.mark.slow
@pytest.mark.slow
def test_installed_console_script(tmp_path):
    script = shutil.which("gradscope", path=str(Path(sys.executable).parent))
    assert script, "the gradscope console script is not installed next to this Python"
    version = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and gradscope.__version__ in version.stdout
    bad = subprocess.run([script, "inspect", str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "no gradscope run" in bad.stderr and "Traceback" not in bad.stderr
