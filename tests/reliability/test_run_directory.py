"""A run directory has one writer, is never mixed with another run or deleted when it is not a
run, and its status says how the run ended."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
import torch.nn.functional as F

import gradscope
from gradscope.recording import termination
from gradscope.store import RunError
from gradscope.store import lock as lock_module
from gradscope.store import writer as writer_module
from gradscope.testing.models import TinyMLP


def _steps(rec, model, n, x=None, y=None):
    x = torch.randn(8, 8) if x is None else x
    y = torch.randint(0, 4, (8,)) if y is None else y
    for _ in range(n):
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        rec.step(loss=loss)


def _writer_threads():
    return [t for t in threading.enumerate() if t.name.startswith("gradscope-writer")]


# ------------------------------------------------------------------ one writer per directory


def test_a_second_writer_in_the_same_process_is_refused_even_with_overwrite(run_dir):
    with gradscope.watch(TinyMLP(), run_dir) as rec:
        for overwrite in (False, True):
            with pytest.raises(RunError, match="another Recorder in this process"):
                gradscope.watch(TinyMLP(), run_dir, overwrite=overwrite)
        _steps(rec, rec.model, 2)
    assert sorted(gradscope.load_run(run_dir).scalars.step) == [0, 1]  # the first writer's data, untouched


_HOLDER = textwrap.dedent("""
    import sys, gradscope
    from gradscope.testing.models import TinyMLP
    rec = gradscope.watch(TinyMLP(), sys.argv[1])
    print("holding", flush=True)
    sys.stdin.read()
""")


def test_a_writer_in_another_process_is_refused_and_its_lock_dies_with_it(run_dir):
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(RunError, match=f"process {holder.pid}"):
            gradscope.watch(TinyMLP(), run_dir, overwrite=True)
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the lock
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    with gradscope.watch(TinyMLP(), run_dir, overwrite=True) as rec:  # no stale lock
        _steps(rec, rec.model, 1)
    assert gradscope.load_run(run_dir).status == "finished"


# ------------------------------------------------------------------ overwrite replaces only runs


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path):
    folder = tmp_path / "mine"
    (folder / "scalars").mkdir(parents=True)
    (folder / "scalars" / "notes.csv").write_text("precious")
    with pytest.raises(RunError, match="no gradscope meta.json"):
        gradscope.watch(TinyMLP(), folder, overwrite=True)
    assert (folder / "scalars" / "notes.csv").read_text() == "precious"
    assert not _writer_threads()


def test_overwrite_keeps_files_gradscope_did_not_write(run_dir):
    with gradscope.watch(TinyMLP(), run_dir) as rec:
        _steps(rec, rec.model, 3)
    (run_dir / "notes.txt").write_text("mine")
    (run_dir / "layers" / "README").write_text("also mine")
    with gradscope.watch(TinyMLP(), run_dir, overwrite=True) as rec:
        _steps(rec, rec.model, 1)
    assert sorted(gradscope.load_run(run_dir).scalars.step) == [0]  # the old run's parts are gone
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert (run_dir / "layers" / "README").read_text() == "also mine"


def test_an_empty_run_path_is_refused_and_deletes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("layers", "blocks", "scalars"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="run= is empty"):
        gradscope.watch(TinyMLP(), "", overwrite=True)
    assert all((tmp_path / f / "keep.txt").exists() for f in ("layers", "blocks", "scalars"))


# ------------------------------------------------------------------ a failed watch() leaves nothing


@pytest.mark.parametrize("meta", [{"x": float("nan")}, {"t": torch.ones(2)}, {"inf": [float("inf")]}])
def test_meta_that_json_cannot_hold_is_refused_before_any_file(tmp_path, meta):
    run = tmp_path / "r"
    with pytest.raises(ValueError, match="meta="):
        gradscope.watch(TinyMLP(), run, meta=meta)
    assert not run.exists() and not _writer_threads()


def test_a_full_disk_at_watch_leaves_no_folder_no_temporary_and_no_thread(tmp_path, monkeypatch):
    def full(path, text):
        with open(path, "w") as f:  # the temporary is created, then the disk is full
            f.write(text[:0])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module, "write_json", lambda path, data: writer_module.atomic_write(
        path, lambda p: full(p, json.dumps(data))))
    run = tmp_path / "r"
    with pytest.raises(RunError, match=f"could not write run {run}.*No space left"):
        gradscope.watch(TinyMLP(), run)
    assert not run.exists() and not _writer_threads()


@pytest.mark.parametrize("device", ["meta", "nonsense"])
def test_a_device_without_values_is_refused(run_dir, device):
    with pytest.raises(ValueError, match="device="):
        gradscope.watch(TinyMLP(), run_dir, device=device)
    assert not run_dir.exists()


def test_a_model_on_the_meta_device_is_refused(run_dir):
    with torch.device("meta"):
        model = TinyMLP()
    with pytest.raises(ValueError, match="meta device"):
        gradscope.watch(model, run_dir)


# ------------------------------------------------------------------ status says how the run ended


def test_write_errors_mark_the_run_failed_once_each_with_the_steps_lost(run_dir, monkeypatch):
    real = writer_module.pq.write_table
    written = []

    def flaky(table, where, *args, **kwargs):
        if len(written) >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(where)
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(writer_module.pq, "write_table", flaky)
    rec = gradscope.watch(TinyMLP(), run_dir, flush_every=2)
    with pytest.warns(RuntimeWarning, match="No space left") as caught:
        _steps(rec, rec.model, 12)
        with pytest.raises(RunError) as error:
            rec.close()
    assert len([w for w in caught if "No space" in str(w.message)]) == 1  # one warning per distinct error
    message = str(error.value)
    assert message.count("No space left") == 1 and "times" in message
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "failed"
    assert any("steps not written" in e for e in meta["errors"])
    assert not _writer_threads()


def test_sys_exit_zero_inside_watch_is_a_normal_end(run_dir):
    with pytest.raises(SystemExit):
        with gradscope.watch(TinyMLP(), run_dir) as rec:
            _steps(rec, rec.model, 2)
            sys.exit(0)
    assert gradscope.load_run(run_dir).status == "finished"


def test_an_exception_marks_the_run_failed(run_dir):
    with pytest.raises(ZeroDivisionError):
        with gradscope.watch(TinyMLP(), run_dir) as rec:
            _steps(rec, rec.model, 2)
            1 / 0  # noqa: B018
    assert gradscope.load_run(run_dir).status == "failed"


class _Interrupt(torch.nn.Module):
    """Raises KeyboardInterrupt (Ctrl-C) in the forward of the third recorded step."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return x


@pytest.mark.parametrize("where", ["forward", "between backward and step"])
def test_ctrl_c_mid_step_marks_the_run_interrupted_and_leaves_out_the_partial_step(run_dir, where):
    model = TinyMLP(depth=4)
    if where == "forward":
        model.insert(4, _Interrupt())  # after two of the five Linear layers
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    with pytest.raises(KeyboardInterrupt):
        with gradscope.watch(model, run_dir, optimizer=opt):
            for step in range(5):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                if where != "forward" and step == 2:
                    raise KeyboardInterrupt
                opt.step()
    run = gradscope.load_run(run_dir)
    assert run.status == "interrupted" and run.meta["schedule"]["dropped_step"] == 2
    assert sorted(run.layers.step.unique()) == [0, 1]
    assert (run.layers.groupby("step").layer.nunique() == 5).all()


_UNCAUGHT = textwrap.dedent("""
    import sys, torch, gradscope
    from gradscope.testing.models import TinyMLP
    model = TinyMLP()
    rec = gradscope.watch(model, sys.argv[1])  # never closed: the exit handler closes it
    model(torch.randn(2, 8)).sum().backward()
    rec.step()
    raise {exc}
""")


@pytest.mark.parametrize(("exc", "status"), [("ValueError('bug')", "failed"), ("KeyboardInterrupt", "interrupted")])
def test_an_unclosed_recorder_at_exit_gets_the_status_of_how_the_program_ended(run_dir, exc, status):
    subprocess.run([sys.executable, "-c", _UNCAUGHT.format(exc=exc), str(run_dir)], capture_output=True, timeout=120)
    run = gradscope.load_run(run_dir)
    assert run.status == status and sorted(run.scalars.step) == [0]


# ------------------------------------------------------------------ evaluations


def test_log_eval_more_often_than_every_loses_no_evaluation(run_dir):
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    with gradscope.watch(model, run_dir, every=2, optimizer=opt) as rec:
        for step in range(6):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            rec.log_eval(loss=float(step))  # after step k: recorded at step k + 1, the one it precedes
    scalars = gradscope.load_run(run_dir).scalars
    evals = scalars.dropna(subset=["eval_loss"])
    assert list(evals.step) == [1, 2, 3, 4, 5, 6]
    assert list(evals.eval_loss) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert sorted(scalars.dropna(subset=["lr"]).step) == [0, 2, 4]  # training rows only on recorded steps


# ------------------------------------------------------------------ found in review


def test_a_second_writer_that_opened_a_lock_file_removed_under_it_takes_the_new_one(run_dir, monkeypatch):
    """A writer whose start failed removes the lock file; one that had opened it must not hold a
    lock on the removed file while a third writer locks the new one."""
    run_dir.mkdir()
    path = run_dir / lock_module.LOCK_FILE
    path.write_text("")
    stale = os.open(path, os.O_RDWR)
    path.unlink()  # the failed writer's cleanup, after the second writer opened the file
    real, calls = lock_module._open_lock_file, []
    monkeypatch.setattr(lock_module, "_open_lock_file",
                        lambda d: calls.append(d) or (stale if len(calls) == 1 else real(d)))
    held = lock_module.RunLock.acquire(run_dir)
    try:
        assert lock_module._same_file(held._fd, path)
        with pytest.raises(RunError, match="being written"):
            lock_module.RunLock.acquire(run_dir)  # a third writer, opening the file at the path
    finally:
        held.release()


def test_a_fifo_in_place_of_the_lock_file_does_not_hang_a_reader(run_dir):
    with gradscope.watch(TinyMLP(), run_dir) as rec:
        _steps(rec, rec.model, 1)
    (run_dir / lock_module.LOCK_FILE).unlink()
    os.mkfifo(run_dir / lock_module.LOCK_FILE)
    assert gradscope.load_run(run_dir).status == "finished"
    assert not lock_module.writer_alive(run_dir)


def test_a_write_error_is_raised_by_one_flush_not_by_every_later_one(run_dir, monkeypatch):
    real, failures = writer_module.pq.write_table, [1]

    def once(table, where, *args, **kwargs):
        if failures:
            failures.pop()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *args, **kwargs)

    monkeypatch.setattr(writer_module.pq, "write_table", once)
    rec = gradscope.watch(TinyMLP(), run_dir)
    with pytest.warns(RuntimeWarning, match="No space"):
        _steps(rec, rec.model, 2)
        with pytest.raises(RunError):
            rec.flush(wait=True)
    _steps(rec, rec.model, 2)
    rec.flush(wait=True)  # the disk has room again: training goes on
    with pytest.raises(RunError):
        rec.close()
    run = gradscope.load_run(run_dir)
    assert run.status == "failed" and sorted(run.scalars.step) == [2, 3]


def test_a_close_that_cannot_copy_the_statistics_still_says_failed_and_keeps_the_users_error(run_dir,
                                                                                            monkeypatch):
    def broken(upto):
        raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.warns(RuntimeWarning, match="device-side assert"):
        with pytest.raises(IndexError):
            with gradscope.watch(TinyMLP(), run_dir) as rec:
                _steps(rec, rec.model, 2)
                monkeypatch.setattr(rec._buffer, "take", broken)
                raise IndexError("target out of bounds")
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "failed" and any("device-side assert" in e for e in meta["errors"])


def test_meta_may_not_overwrite_what_gradscope_writes(run_dir):
    with pytest.raises(ValueError, match="'status'"):
        gradscope.watch(TinyMLP(), run_dir, meta={"status": "finished", "task": {"name": "mine"}})
    assert not run_dir.exists()


def test_a_traceback_from_before_watch_does_not_fail_the_run_at_exit(run_dir, monkeypatch):
    monkeypatch.setattr(sys, "last_type", ValueError, raising=False)  # a REPL's earlier error
    rec = gradscope.watch(TinyMLP(), run_dir)
    _steps(rec, rec.model, 1)
    termination.close_open_recorders()  # what the exit handler does
    assert rec.closed and gradscope.load_run(run_dir).status == "finished"


def test_the_sigterm_handler_knows_gradscope_code_by_module_name_not_path():
    inside = {"__name__": "gradscope.recording.probes", "termination": termination, "sys": sys}
    exec("def probe():\n    return termination._inside_gradscope(sys._getframe())", inside)
    assert inside["probe"]() is True
    assert termination._inside_gradscope(sys._getframe()) is False
