"""Writer processes for the reliability tests, run as a script (not collected by pytest).

``python trainer_process.py train RUN`` trains a tiny MLP under ``gradscope.watch`` (every=1,
flush_every=3) until killed, writing one line per step to RUN.progress: ``step K`` or, every
fourth step after ``flush(wait=True)`` returned, ``flushed K``.

``python trainer_process.py zygote`` imports torch and gradscope once, then for each line
``FUNCTION ARG...`` on stdin forks a child that runs ``FUNCTION(*ARGS)`` (``train`` or ``race``)
and prints the child's pid. Forking a process that has imported but not yet run torch takes
milliseconds, so a test can start many writers, or kill them at random moments, within seconds.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import torch
import torch.nn.functional as F

import gradscope
from gradscope.testing.models import TinyMLP


def train(run: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyMLP(depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
    with open(run + ".progress", "a", buffering=1) as progress:
        with gradscope.watch(model, run, every=1, flush_every=3, optimizer=opt) as rec:
            for step in range(1_000_000):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                rec.step(loss=loss)
                opt.step()
                if step % 4 == 3:
                    rec.flush(wait=True)
                    progress.write(f"flushed {step}\n")
                else:
                    progress.write(f"step {step}\n")


def race(run: str, start: str, overwrite: str) -> None:
    """Wait until ``start`` (a time.time()), then try to become ``run``'s writer; write the outcome."""
    from gradscope.testing.models import TinyMLP

    while time.time() < float(start):
        pass
    try:
        rec = gradscope.watch(TinyMLP(), run, overwrite=overwrite == "1")
    except Exception as exc:
        outcome = f"refused {type(exc).__name__}"
    else:
        outcome = "accepted"
    with open(f"{run}.{os.getpid()}.outcome", "w") as f:
        f.write(outcome)
    if outcome == "accepted":
        time.sleep(0.5)
        rec.close()


FUNCTIONS = {"train": train, "race": race}


def zygote() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed children are reaped at once
    for line in sys.stdin:
        function, *args = line.split()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                FUNCTIONS[function](*args)
                code = 0
            finally:
                os._exit(code)
        print(pid, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "zygote":
        zygote()
    else:
        FUNCTIONS[sys.argv[1]](*sys.argv[2:])
