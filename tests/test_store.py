"""Run format: crash safety, clear errors on bad runs, no pickle."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

import gradscope
from gradscope.store import SCHEMA_VERSION, RunError, RunNotFoundError
from gradscope.testing import TinyMLP, batches, train

TRAIN_THEN_HANG = textwrap.dedent("""
    import sys, time, torch
    import gradscope
    from gradscope.testing import TinyMLP, train_step
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = gradscope.watch(model, sys.argv[1], optimizer=opt, flush_every=4)
    for step in range(10):
        train_step(model, opt, torch.randn(8, 8), torch.randint(0, 4, (8,)), rec)
    rec.flush(wait=True)   # steps 0..9 are on disk now
    for step in range(3):  # more steps that stay in the device buffer
        train_step(model, opt, torch.randn(8, 8), torch.randint(0, 4, (8,)))
    print("FLUSHED", flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
def test_sigkill_after_flush_leaves_a_loadable_run(tmp_path):
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", TRAIN_THEN_HANG, str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "FLUSHED", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    run = gradscope.load_run(run_dir)
    assert run.meta["status"] == "running" and run.status == "interrupted"  # it never closed; its writer is gone
    assert run.scalars.step.tolist() == list(range(10))
    assert sorted(run.layers.step.unique().tolist()) == list(range(10))
    assert run.layers.groupby("step").size().eq(4).all()
    assert run.layer_table.depth.tolist() == [0, 1, 2, 3]  # execution order was saved with the parts


def test_temporary_files_of_an_interrupted_write_are_ignored(run_dir):
    train(TinyMLP(), batches("mlp", steps=3), run=run_dir)
    (run_dir / "layers" / ".part-000001.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert len(gradscope.load_run(run_dir).layers) == 12


def test_rows_come_in_network_order_with_names_missing_from_meta_last(run_dir):
    import pyarrow.parquet as pq

    train(TinyMLP(), batches("mlp", steps=3), run=run_dir, flush_every=1)  # parts: step 0, steps 1-2
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    for layer in meta["layers"]:  # network order reversed against the parts' row order
        layer["depth"] = 3 - layer["depth"]
    meta["layers"] = [layer for layer in meta["layers"] if layer["name"] != "2"]
    meta_path.write_text(json.dumps(meta))
    # a part written before a column existed: the column reads as missing, the rest as written
    part = run_dir / "layers" / "part-000000.parquet"
    pq.write_table(pq.read_table(part).drop_columns(["grad_out_rms"]), part)
    layers = gradscope.load_run(run_dir).layers
    for _, group in layers.groupby(["step", "phase"], sort=False):
        assert group.layer.tolist() == ["6", "4", "0", "2"]  # by depth, the unknown one last
        assert group.depth.tolist()[:3] == [0.0, 1.0, 3.0] and pd.isna(group.depth.iloc[3])
        assert pd.isna(group.type.iloc[3]) and group.type.iloc[0] == "Linear"
    assert layers.step.is_monotonic_increasing
    first = layers.step == layers.step.min()
    assert layers.grad_out_rms[first].isna().all() and layers.grad_out_rms[~first].notna().all()
    assert layers.layer.map(type).eq(str).all() and layers.phase.map(type).eq(str).all()


def test_missing_run_names_the_path(tmp_path):
    with pytest.raises(RunNotFoundError, match="nowhere"):
        gradscope.load_run(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunNotFoundError, match="meta.json"):
        gradscope.load_run(tmp_path / "empty")


def test_truncated_part_is_refused_naming_the_file(run_dir):
    train(TinyMLP(), batches("mlp", steps=3), run=run_dir)
    part = run_dir / "layers" / "part-000000.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    with pytest.raises(RunError, match=str(part)):
        gradscope.load_run(run_dir)


def test_damaged_or_unknown_meta_is_refused_naming_the_file(run_dir):
    train(TinyMLP(), batches("mlp", steps=1), run=run_dir)
    meta_path = run_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["schema_version"] = SCHEMA_VERSION + 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(RunError, match=f"{meta_path}.*schema_version"):
        gradscope.load_run(run_dir)
    meta_path.write_text('{"schema_version": 1, "layers": [')
    with pytest.raises(RunError, match=str(meta_path)):
        gradscope.load_run(run_dir)


def test_existing_run_is_not_overwritten_unless_asked(run_dir):
    train(TinyMLP(), batches("mlp", steps=2), run=run_dir)
    model = TinyMLP()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        gradscope.watch(model, run_dir)
    assert len(gradscope.load_run(run_dir).scalars) == 2  # untouched
    train(model, batches("mlp", steps=1), run=run_dir, overwrite=True)
    assert len(gradscope.load_run(run_dir).scalars) == 1


def test_meta_describes_the_run(run_dir):
    train(TinyMLP(), batches("mlp", steps=2), run=run_dir, every=1)
    meta = gradscope.load_run(run_dir).meta
    assert meta["schema_version"] == SCHEMA_VERSION and meta["status"] == "finished"
    assert meta["model"]["class"] == "TinyMLP" and meta["optimizer"]["class"] == "SGD"
    assert meta["env"]["torch"] == torch.__version__ and meta["env"]["device"] == "cpu"
    assert [layer["name"] for layer in meta["layers"]] == ["0", "2", "4", "6"]
    assert {"type", "params", "depth", "rel_depth", "calls"} <= set(meta["layers"][0])


def test_run_directory_is_plain_parquet_readable_without_gradscope(run_dir):
    import pandas as pd

    train(TinyMLP(), batches("mlp", steps=3), run=run_dir)
    frame = pd.read_parquet(run_dir / "layers")
    assert {"step", "phase", "layer", "act_std", "grad_norm"} <= set(frame.columns)
    assert len(frame) == 12


def test_no_pickle_in_the_package():
    """Run data is JSON and Parquet; loading must never be able to run code. The one pickle
    reader is CIFAR-10's own batch format, through an unpickler that builds only numpy arrays."""
    root = Path(gradscope.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for needle in ("torch.load(", "pickle.load(", "pickle.loads(", "read_pickle", "pickle.Unpickler("):
            assert needle not in text, f"{path} uses {needle}"
        if path.name != "cifar.py":
            assert "import pickle" not in text, f"{path} imports pickle"
    assert "def find_class" in (root / "lab" / "tasks" / "cifar.py").read_text()
