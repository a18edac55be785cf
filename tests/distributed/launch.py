"""Start a job of N gloo processes on this machine, as torchrun would (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), and make sure none outlives it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

WORKER = Path(__file__).with_name("worker.py")


@dataclass
class Rank:
    returncode: int | None  # None: killed at the deadline
    stderr: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(world: int, out: Path, scenarios: list[str], timeout: float = 90.0) -> list[Rank]:
    """Run ``worker.py out scenarios...`` on ``world`` processes; every one is gone on return."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs, logs = [], []
    try:
        for rank in range(world):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                   "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                   "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
            log = open(out / f"stderr.rank{rank}.txt", "w")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), *scenarios], env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + timeout
        codes: list[int | None] = []
        for p in procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    return [Rank(code, (out / f"stderr.rank{r}.txt").read_text()) for r, code in enumerate(codes)]
