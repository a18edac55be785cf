"""``gradscope run --nproc N``: one run from N DDP processes, read like any other; bad input
refused before a process starts; a failing process stops the job and leaves none behind.

The end-to-end tests start real processes (the CLI, torchrun's agent in it, two workers on gloo).
Each carries a tag in its environment, so that whatever is still alive at the end, even a
worker torchrun started in its own session, is found, killed and reported.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from gradscope.cli import main as cli_main

import gradscope
from gradscope.lab import distributed
from gradscope.lab.train import train

TAG = "GRADSCOPE_TEST_NPROC_TAG"
# small and fast: a 4-layer MLP, a global batch of 32 (16 per process), one evaluation
SETTINGS = ["--steps", "6", "--every", "2", "--set", "depth=4", "--set", "width=32", "--batch-size", "32",
            "--eval-every", "6", "--device", "cpu", "--seed", "3", "--no-progress"]
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "TORCHELASTIC_RUN_ID", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")


def _tagged(tag: str) -> list[int]:
    """Processes whose environment holds ``TAG=tag`` (Linux /proc; none found elsewhere)."""
    marker = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and int(entry.name) != os.getpid():
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture
def gradscope_cli(tmp_path):
    """Run ``gradscope ARGS`` in a subprocess with a timeout; fail the test if any process it
    started outlives it."""
    tag = uuid.uuid4().hex

    def run(*args: object, extra_env: dict[str, str] | None = None, timeout: float = 120):
        env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
        env.update({TAG: tag, "GRADSCOPE_DEBUG": "", **(extra_env or {})})
        proc = subprocess.Popen([sys.executable, "-m", "gradscope.cli.main", *map(str, args)], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # torchrun's agent stops its workers on SIGTERM
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
            _kill(_tagged(tag))
            pytest.fail(f"gradscope {' '.join(map(str, args))} ran over {timeout} s")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    yield run
    left = _tagged(tag)
    _kill(left)
    assert not left, f"processes left behind: {left}"


def test_two_processes_record_one_run_that_inspect_and_report_read(gradscope_cli, tmp_path):
    result = gradscope_cli("run", "mlp_plain", *SETTINGS, "--nproc", "2", "--out", tmp_path / "two")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("mlp_plain: 6 steps") == 1, result.stdout  # rank 0 alone reports
    two = gradscope.load_run(tmp_path / "two" / "mlp_plain")
    assert two.status == "finished"
    assert two.meta["env"]["world_size"] == 2
    assert two.meta["recipe"]["batch_size"] == 32  # the global batch; 16 per process

    # one process, the same settings, one step: the same weights on the same first global batch
    one = gradscope.load_run(train("mlp_plain", steps=1, every=2, overrides={"depth": 4, "width": 32}, batch_size=32,
                                   device="cpu", seed=3, out=tmp_path, run_name="one", progress=False).run)
    names = [layer["name"] for layer in two.meta["layers"]]
    assert names == [layer["name"] for layer in one.meta["layers"]] and not any(n.startswith("module.") for n in names)
    trained = two.scalars.dropna(subset=["loss"])
    assert trained.step.tolist() == [0, 2, 4] and trained.accuracy.between(0, 1).all()
    # the mean of the two halves' losses is the global batch's loss
    assert trained.loss.iloc[0] == pytest.approx(one.scalars.loss.iloc[0], rel=1e-5)
    assert trained.accuracy.iloc[0] == pytest.approx(one.scalars.accuracy.iloc[0])
    assert two.scalars.eval_loss.notna().sum() == 1

    runner = CliRunner()
    shown = runner.invoke(cli_main.main, ["inspect", str(two.path)], catch_exceptions=False)
    assert shown.exit_code == 0 and "status finished" in shown.output and "blocks.0.branch.1" in shown.output
    report = tmp_path / "report.html"
    made = runner.invoke(cli_main.main, ["report", str(two.path), "-o", str(report)], catch_exceptions=False)
    assert made.exit_code == 0, made.output
    html = report.read_text()
    assert "gradscope report: mlp_plain" in html and 'id="curves"' in html and 'id="gradient-flow"' in html


@pytest.mark.parametrize("args, message", [
    (["mlp_plain", "--nproc", "0"], "--nproc"),
    (["resnet21", "--nproc", "2"], "did you mean"),
    (["mlp_plain", "--nproc", "3", "--batch-size", "16"], "multiple of 3"),
    (["mlp_plain", "--nproc", "2", "--task", "dyck"], "is for lm models"),
    (["mlp_plain", "--nproc", "2", "--device", "cuda:0"], "cuda"),
])
def test_bad_input_with_nproc_is_refused_before_processes_start(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def launch(*_: object) -> int:
        raise AssertionError("processes were started")

    monkeypatch.setattr(cli_main, "_launch", launch)
    result = CliRunner().invoke(cli_main.main, ["run", *args, "--steps", "1"], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.output and not (tmp_path / "runs").exists()


def test_nproc_under_torchrun_must_match_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    result = CliRunner().invoke(cli_main.main, ["run", "mlp_plain", "--nproc", "2"], catch_exceptions=False)
    assert result.exit_code == 2 and "under torchrun" in result.stderr


def test_each_process_is_given_the_options_as_parsed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    started = {}
    monkeypatch.setattr(cli_main, "_launch", lambda processes, arguments: started.update(n=processes, args=arguments))
    given = ["mlp_plain", "mlp_residual", "--steps", "3", "--lr", "0.01", "--set", "depth=4", "--set", "width=8",
             "--no-progress", "--watch-activations", "--nproc", "2", "--batch-size", "8", "--device", "cpu"]
    result = CliRunner().invoke(cli_main.main, ["run", *given], catch_exceptions=False)
    assert result.exit_code == 0 and started["n"] == 2 and "--nproc" not in started["args"]
    parsed = cli_main.run_command.make_context("run", list(given)).params
    assert cli_main.run_command.make_context("run", list(started["args"])).params == {**parsed, "nproc": 1}


def test_each_process_takes_an_equal_slice_of_the_global_batch():
    assert distributed.share(128, 1) == 128 and distributed.share(128, 4) == 32
    with pytest.raises(ValueError, match="multiple of 3 \\(such as 126\\)"):
        distributed.share(128, 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        distributed.share(2, 4)
    x, y = (torch.arange(12).view(6, 2), torch.arange(6) * 10), torch.arange(6)
    parts = [distributed.slice_of(x, y, distributed.World(rank, rank, 3)) for rank in range(3)]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert all(torch.equal(torch.cat([p[0][i] for p in parts]), x[i]) for i in range(2))


def test_the_place_among_processes_comes_from_torchrun_variables():
    assert distributed.from_env({}) is None
    assert distributed.from_env({"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}) is None
    assert distributed.from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == distributed.World(3, 1, 4)
    for env in ({"WORLD_SIZE": "two", "RANK": "0"}, {"WORLD_SIZE": "2"}, {"WORLD_SIZE": "2", "RANK": "2"}):
        with pytest.raises(ValueError, match="RANK|WORLD_SIZE"):
            distributed.from_env(env)


def test_bad_model_with_nproc_is_one_line_from_one_process(gradscope_cli):
    result = gradscope_cli("run", "resnet21", "--nproc", "2", timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "resnet21" in result.stderr


def test_a_failing_process_stops_the_job(gradscope_cli, tmp_path):
    """Rank 1 dies once the processes have formed their group: rank 0, which needs it for every
    collective, is stopped too, the command fails naming rank 1's exit code, and no process is left."""
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(
        "import os, sys, threading, time\n"
        "def _die():\n"
        "    while True:\n"
        "        time.sleep(0.02)\n"
        "        dist = sys.modules.get('torch.distributed')\n"
        "        if getattr(dist, 'is_initialized', lambda: False)():  # formed by the CLI, before training\n"
        "            os._exit(3)\n"
        "if os.environ.get('RANK') == '1':\n"
        "    threading.Thread(target=_die, daemon=True).start()\n")
    path = os.pathsep.join(filter(None, [str(tmp_path / "inject"), os.environ.get("PYTHONPATH")]))
    result = gradscope_cli("run", "mlp_plain", *SETTINGS, "--steps", "3000", "--nproc", "2", "--out", tmp_path,
                           extra_env={"PYTHONPATH": path}, timeout=90)
    assert result.returncode != 0, result.stderr
    assert "rank 1 (exit code 3)" in result.stderr.splitlines()[-1]  # rank 0 may be listed too, if it failed first
    meta = tmp_path / "mlp_plain" / "meta.json"
    assert not meta.exists() or gradscope.load_run(meta.parent).status != "finished"
