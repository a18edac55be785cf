"""``gradscope export tensorboard``: figures read back with TensorBoard's own event reader."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from click.testing import CliRunner
from gradscope.cli.main import main

import gradscope
from gradscope.testing import TinyMLP, batches, train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from gradscope.integrations import tensorboard  # noqa: E402


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("tb") / "mlp"
    torch.manual_seed(0)
    train(TinyMLP(), batches("mlp", steps=6), run=path, every=2, lr=0.05)
    return path


def test_export_writes_every_figure_grouped_by_statistic(recorded, tmp_path):
    result = CliRunner().invoke(main, ["export", "tensorboard", str(recorded), "--logdir", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    run = gradscope.load_run(recorded)
    events = _scalars(tmp_path / "tb" / run.name)
    train_rows = run.layers[run.layers.phase == "train"]
    layer = train_rows.layer.iloc[0]
    expected = train_rows[train_rows.layer == layer][["step", "grad_out_norm"]].to_numpy()
    got = events[f"grad_out_norm/{layer}"]
    assert [s for s, _ in got] == [0, 2, 4]
    assert [v for _, v in got] == pytest.approx(expected[:, 1].tolist(), rel=1e-6)
    assert [v for _, v in events["scalars/loss"]] == pytest.approx(run.scalars.loss.tolist(), rel=1e-6)
    sections = {tag.split("/")[0] for tag in events}
    assert {"act_std", "grad_norm", "scalars"} <= sections
    assert len(sections) < len(events)  # one section per statistic, not per layer
    assert all(len(tag.split("/")) == 2 for tag in events if not tag.startswith("scalars/"))
    again = CliRunner().invoke(main, ["export", "tensorboard", str(recorded), "--logdir", str(tmp_path / "tb")])
    assert again.exit_code == 2 and "earlier export" in again.output  # no silent duplicate points
    assert CliRunner().invoke(main, ["export", "tensorboard", str(recorded), "--logdir", str(tmp_path / "tb"),
                                     "--overwrite"]).exit_code == 0
    assert _scalars(tmp_path / "tb" / run.name) == events


def test_missing_run_is_an_input_error(tmp_path):
    result = CliRunner().invoke(main, ["export", "tensorboard", str(tmp_path / "nope"), "--logdir", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_live_follows_a_run_until_it_ends(tmp_path):
    model, logdir, path = TinyMLP(), tmp_path / "tb", tmp_path / "live"
    data = batches("mlp", steps=6)
    result: dict = {}
    follower = threading.Thread(target=lambda: result.update(
        tensorboard.follow([path], logdir, interval=0.05, timeout=60)), daemon=True)
    follower.start()  # before the run exists: it waits for it
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradscope.watch(model, path, optimizer=opt, flush_every=1) as rec:
        for i, (x, y) in enumerate(data):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            rec.step(loss=loss)
            if i == 2:
                rec.flush(wait=True)
                time.sleep(0.3)  # a pass sees the run half written
    follower.join(timeout=60)
    assert not follower.is_alive()
    events = _scalars(logdir / "live")
    assert [s for s, _ in events["scalars/loss"]] == list(range(6))  # each step once
    assert result["live"] == sum(len(v) for v in events.values())


def test_live_cli_on_a_finished_run_writes_it_once_and_returns(recorded, tmp_path):
    result = CliRunner().invoke(main, ["export", "tensorboard", str(recorded), "--logdir", str(tmp_path / "tb"),
                                       "--live", "--interval", "0.1"])
    assert result.exit_code == 0, result.output
    events = _scalars(tmp_path / "tb" / gradscope.load_run(recorded).name)
    assert [s for s, _ in events["scalars/loss"]] == [0, 2, 4]


def test_steps_after_are_counted_per_table(recorded):
    """Attribution checkpoints may be flushed ahead of the other tables: each table keeps its own place."""
    run = gradscope.load_run(recorded)
    events = list(tensorboard.scalar_events(run, after={"layers": 10, "blocks": 10, "attribution": 10}))
    assert events and {tag.split("/")[0] for tag, _, _ in events} == {"scalars"}
    assert sorted({step for _, _, step in events}) == [0, 2, 4]
