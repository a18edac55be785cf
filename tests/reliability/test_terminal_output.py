"""``gradscope inspect`` and the demo's summaries never pass a run's text to the terminal raw: an
escape sequence in a layer name, run name, task or model name is shown escaped, not obeyed."""

from __future__ import annotations

import json
import re

import pytest
import torch
from click.testing import CliRunner
from gradscope.cli.main import main
from gradscope.cli.summary import findings_text, run_summary, safe
from torch import nn

import gradscope
from gradscope.testing import batches, train

TITLE = "\x1b]0;pwned\x07"  # OSC: set the terminal's title
CLEAR = "\x1b[2J"  # CSI: clear the screen
EVIL = f"x{TITLE}{CLEAR}"
#: Any control character but the newline between lines (C0, DEL, C1).
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")


class Poisoned(nn.Linear):
    """NaN in the first sample's output, hidden downstream: a finding will quote this layer's name."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        first = (torch.arange(y.shape[0]) == 0)[:, None].expand_as(y)
        return torch.where(first, torch.full_like(y, float("nan")), y)


class Net(nn.Module):
    """Its poisoned layer is registered under a name with escape sequences (module names may hold
    any character but a dot), so the name is in the recorded tables and meta.json as it would be."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.add_module(f"bad{EVIL}", Poisoned(16, 16))
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = getattr(self, f"bad{EVIL}")
        return self.out(torch.nan_to_num(bad(torch.relu(self.a(x)))))


@pytest.fixture(scope="module")
def evil_run(tmp_path_factory):
    """A recorded run in a directory named with escape sequences, whose meta.json also names
    the run, the task, the model and the schedule that way."""
    path = tmp_path_factory.mktemp("evil") / f"run{EVIL}"
    torch.manual_seed(0)
    train(Net(), batches("mlp", 2), run=path)
    meta = json.loads((path / "meta.json").read_text())
    assert any(TITLE in layer["name"] for layer in meta["layers"])
    meta["run"] = f"run{EVIL}"
    meta["task"] = {"name": f"task{EVIL}"}
    meta["model"]["class"] = f"Model{EVIL}"
    meta["schedule"]["every"] = f"1{CLEAR}"
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def assert_clean(text: str) -> None:
    assert not CONTROL.search(text), repr(CONTROL.search(text).group())
    assert "\\x1b]0;pwned\\x07" in text and "\\x1b[2J" in text


def test_safe_escapes_every_control_character():
    assert safe("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert safe("\x00\t\n\x7f\x9b\x85") == "\\x00\\x09\\x0a\\x7f\\x9b\\x85"
    assert safe("evil\u202egnp.exe") == "evil\\u202egnp.exe"  # right-to-left override
    assert safe("conv1 · 层 é") == "conv1 · 层 é"  # printable text stays as it is


def test_run_summary_and_findings_escape_untrusted_names(evil_run):
    run = gradscope.load_run(evil_run)
    assert any(TITLE in name for name in run.layers.layer)  # the names really reach the tables
    summary = run_summary(run, limit=None)
    assert_clean(summary)
    assert "taskx\\x1b]0;pwned\\x07\\x1b[2J" in summary and "Modelx\\x1b]0;pwned" in summary
    findings = gradscope.diagnose(run)
    assert any(TITLE in f.explanation for f in findings)  # a finding quotes a layer name
    assert_clean(findings_text(findings))


def test_inspect_command_output_is_clean(evil_run):
    # color=True: click would otherwise strip some CSI sequences itself when not on a terminal
    result = CliRunner().invoke(main, ["inspect", str(evil_run), "--all"], color=True)
    assert result.exit_code == 0, result.output
    assert_clean(result.output)
