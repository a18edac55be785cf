"""Killed writers: SIGKILL at random moments leaves runs that load with every flushed step, and
no stale lock; SIGTERM writes every completed step and marks the run interrupted."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gradscope
from gradscope.testing.models import TinyMLP

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and fork")

TRAINER = Path(__file__).with_name("trainer_process.py")
LAYERS = 5  # TinyMLP(depth=4): four hidden Linear layers and the output layer


def _wait_for_lines(progress: Path, n: int, timeout: float = 60.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = progress.read_text().splitlines() if progress.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.002)
    raise AssertionError(f"the training process wrote {progress.name} too slowly")


def _check_run_after_kill(run: Path, lines: list[str]) -> None:
    """The run loads; its steps are a gap-free prefix of whole steps holding every flushed one."""
    flushed = [int(line.split()[1]) for line in lines if line.startswith("flushed")]
    loaded = gradscope.load_run(run)
    train = loaded.layers[loaded.layers.phase == "train"]
    steps = sorted(train.step.unique())
    assert steps == list(range(len(steps))), f"steps with gaps: {steps}"
    if flushed:
        assert steps and steps[-1] >= flushed[-1], f"flushed step {flushed[-1]} lost; on disk {steps[-1:]}"
    assert (train.groupby("step").layer.nunique() == LAYERS).all(), "a step with some of its layers"
    assert sorted(loaded.scalars.step) == steps
    assert loaded.status == "interrupted"  # meta.json says running, but no process writes it


def test_sigkill_at_random_moments_keeps_every_flushed_step(tmp_path):
    rng = random.Random(1234)
    zygote = start_zygote()
    kills = 12
    try:
        for trial in range(kills):
            run = tmp_path / f"run{trial}"
            pid = fork(zygote, "train", run)
            lines = _wait_for_lines(Path(f"{run}.progress"), rng.randint(0, 14))
            time.sleep(rng.uniform(0, 0.01))
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.002)
            progress = Path(f"{run}.progress")
            lines = progress.read_text().splitlines() if progress.exists() else []
            if (run / "meta.json").exists():
                _check_run_after_kill(run, lines)
                # no stale lock: a new writer takes the directory at once
                with gradscope.watch(TinyMLP(), run, overwrite=True) as rec:
                    rec.step()
            else:  # killed before watch() wrote anything: nothing that looks like a run is left
                assert not (run / "layers").exists()
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)


def start_zygote() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(TRAINER), "zygote"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def fork(zygote: subprocess.Popen, function: str, *args: object) -> int:
    """A child of the zygote running ``function(*args)``; its pid."""
    zygote.stdin.write(" ".join([function, *map(str, args)]) + "\n")
    zygote.stdin.flush()
    return int(zygote.stdout.readline())


def test_writers_starting_at_the_same_moment_one_is_accepted(tmp_path):
    zygote = start_zygote()
    try:
        for trial, overwrite in enumerate([False, True] * 3):
            run = tmp_path / f"run{trial}"
            start = time.time() + 0.3
            pids = [fork(zygote, "race", run, start, int(overwrite)) for _ in range(3)]
            deadline = time.monotonic() + 60
            while any(_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.01)
            outcomes = sorted(p.read_text().split()[0] for p in tmp_path.glob(f"run{trial}.*.outcome"))
            assert outcomes == ["accepted", "refused", "refused"], (overwrite, outcomes)
            assert gradscope.load_run(run).status == "finished"
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_writes_completed_steps_and_marks_the_run_interrupted(tmp_path):
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, str(TRAINER), "train", str(run)])
    try:
        lines = _wait_for_lines(Path(f"{run}.progress"), 10)
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=30) == -signal.SIGTERM  # still ends by the signal
    finally:
        if child.poll() is None:
            child.kill()
    lines = Path(f"{run}.progress").read_text().splitlines()
    loaded = gradscope.load_run(run)
    assert loaded.meta["status"] == "interrupted"
    train = loaded.layers[loaded.layers.phase == "train"]
    steps = sorted(train.step.unique())
    # every step the process completed is on disk, not only the flushed ones
    assert steps == list(range(len(steps))) and len(steps) >= len(lines)
    assert (train.groupby("step").layer.nunique() == LAYERS).all()


def test_a_forked_child_terminated_leaves_its_parents_run_alone(run_dir):
    """DataLoader workers are forked children holding a copy of the open recorders; SIGTERM ending
    one (as DataLoader's shutdown does) must not close or rewrite the parent's run."""
    with gradscope.watch(TinyMLP(), run_dir) as rec:
        pid = os.fork()
        if pid == 0:  # the child: terminated as a worker would be
            os.kill(os.getpid(), signal.SIGTERM)
            os._exit(3)  # not reached if SIGTERM ended it
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM
        assert gradscope.load_run(run_dir).meta["status"] == "running"
        rec.model(torch.randn(2, 8)).sum().backward()
        rec.step()
    assert gradscope.load_run(run_dir).status == "finished"
