"""Where a report goes (an existing directory is refused before any work, no temporary file is
left behind), and what the flagship report shows: the demo's runs carry attribution, and the
update-ratio rule is not fooled by a learning-rate schedule's decay."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from click.testing import CliRunner
from gradscope.cli.main import main

import gradscope
from gradscope import reports
from gradscope.lab import presets
from gradscope.testing import TinyMLP, batches, train_step


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "run"
    torch.manual_seed(0)
    gradscope.testing.train(TinyMLP(), batches("mlp", 2), run=path)
    return path


# --- the output path ----------------------------------------------------------------------------


def test_an_existing_directory_is_refused_before_rendering(tiny_run, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    monkeypatch.setattr(reports, "collect", lambda runs: pytest.fail("rendered before checking the output"))
    with pytest.raises(ValueError, match="is a directory"):
        reports.build([tiny_run], target)
    assert list(target.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_report_into_a_directory_is_one_line_and_exit_2(tiny_run, tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    result = CliRunner().invoke(main, ["report", str(tiny_run), "-o", str(target)])
    assert result.exit_code == 2 and "is a directory" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and list(target.iterdir()) == []


@pytest.fixture
def no_figures(monkeypatch):
    """The page without its figures: rendering them is most of a build's time, and beside the point here."""
    monkeypatch.setattr(reports, "sections", lambda data: [])


def test_no_temporary_file_is_left_when_writing_fails(tiny_run, tmp_path, monkeypatch, no_figures):
    def refuse(src, dst):
        raise PermissionError(13, "Permission denied", str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError):
        reports.build([tiny_run], tmp_path / "r.html")
    assert list(tmp_path.iterdir()) == []


def test_a_report_replaces_an_existing_file_and_leaves_nothing_else(tiny_run, tmp_path, no_figures):
    (tmp_path / "r.html").write_text("old")
    reports.build([tiny_run], tmp_path / "r.html")
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")


# --- the update-ratio rule and the learning-rate schedule ---------------------------------------


def record_schedule(path, factor, frozen_first: bool = False, lr: float = 0.1, steps: int = 16):
    """TinyMLP trained with SGD at ``lr`` times ``factor(step)``; with ``frozen_first`` its first
    layer sits in a second parameter group with learning rate 0."""
    torch.manual_seed(0)
    model = TinyMLP()
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    groups = [{"params": rest}, {"params": first, "lr": 0.0}] if frozen_first else [{"params": rest + first}]
    opt = torch.optim.SGD(groups, lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    with gradscope.watch(model, path, optimizer=opt) as rec:
        for x, y in batches("mlp", steps):
            train_step(model, opt, x, y, rec)
            schedule.step()
    return gradscope.load_run(path)


def update_findings(run):
    return {f.code: f for f in gradscope.diagnose(run) if f.code.startswith("update_ratio")}


def decayed(step: int) -> float:
    """A step schedule's end: /10 twice, then /10 once more (lr 1e-4 from a peak of 0.1)."""
    return 1.0 if step < 8 else 1e-3


def test_a_decayed_schedule_does_not_read_as_layers_that_barely_move(tmp_path):
    run = record_schedule(tmp_path / "decayed", decayed)
    last = run.layers[(run.layers.step == run.layers.step.max()) & (run.layers.phase == "train")]
    assert (last.update_ratio < 1e-5).any()  # the last step alone would say "barely move"
    assert not update_findings(run)


def test_a_learning_rate_too_small_throughout_still_fires(tmp_path):
    run = record_schedule(tmp_path / "small", lambda step: 1.0, lr=1e-7)
    found = update_findings(run)
    assert set(found) == {"update_ratio_low"} and len(found["update_ratio_low"].layers) == 4


def test_a_frozen_layer_fires_even_under_a_decayed_schedule(tmp_path):
    run = record_schedule(tmp_path / "frozen", decayed, frozen_first=True)
    found = update_findings(run)
    assert set(found) == {"update_ratio_low"}
    f = found["update_ratio_low"]
    assert f.layers == ["0"] and f.evidence["peak_lr"] == pytest.approx(0.1) and f.evidence["peak_lr_step"] == 7
    assert "schedule's decay does not explain it" in f.explanation


# --- the demo's runs --------------------------------------------------------------------------------


@pytest.fixture
def one_thread():
    """Two intra-op threads on a busy 2-core machine cost this test several times one thread's time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_the_demo_preset_records_attribution_and_no_update_ratio_finding(tmp_path, monkeypatch, one_thread):
    """The 'pair' preset as ``gradscope demo`` runs it (models, recipe, step schedule, recording,
    attribution), at 8 steps on 8x8 images in batches of 16 to stay quick on a CPU: its last
    steps run at lr 0.001, where the rule once saw layers that "barely move". The built demo
    report's attribution section is checked by tests/test_reports.py::test_report_and_demo_commands."""
    pair = presets.PRESETS["pair"]
    monkeypatch.setitem(presets.PRESETS, "pair", dataclasses.replace(pair, batch_size=16, task_options={"size": 8}))
    results = presets.run_preset("pair", tmp_path, quick=True, steps=8, device="cpu", progress=False)
    runs = [gradscope.load_run(r.run) for r in results]
    for run in runs:
        checkpoints = run.attribution.step.nunique()
        assert len(run.attribution) and 2 <= checkpoints <= 10, checkpoints
        assert run.meta["attribution"]["method"] == "grad_x_act"
    assert not [f for f in gradscope.diagnose(runs) if f.code.startswith("update_ratio")]


def test_the_demo_preset_spreads_a_handful_of_checkpoints():
    """About six checkpoints whatever the length: the quick demo's 40 steps and the full 300."""
    every = presets.attribution_interval
    for steps in (40, 300):
        checkpoints = len(range(0, steps, every(steps, presets.PRESETS["pair"].attribution_checkpoints)))
        assert 5 <= checkpoints <= 10, (steps, checkpoints)
    assert every(2, 6) == 1
