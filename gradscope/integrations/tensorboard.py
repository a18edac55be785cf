"""Recorded runs as TensorBoard scalars, once or following a run as it is written.

Tags are ``statistic/layer`` (``grad_out_norm/net.3``), so TensorBoard's sections are the
statistics and a model with hundreds of layers still shows one section per figure rather than
one per layer; blocks, the eval phase and attribution get a prefix (``block.id_rel_residual/...``,
``eval.act_std/...``), step scalars are ``scalars/loss`` and the like. Written with TensorBoard's
own event writer (through ``torch.utils.tensorboard``), one sub-directory per run. Needs
``gradscope[tensorboard]``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from gradscope.store import Run, RunNotFoundError, load_run
from gradscope.store.schema import KEYS, columns

#: Event files TensorBoard reads, which an export writes and --overwrite replaces.
EVENT_GLOB = "events.out.tfevents.*"


def scalar_events(run: Run, after: int | dict[str, int] = -1) -> Iterator[tuple[str, float, int]]:
    """``(tag, value, step)`` for every finite figure of ``run`` at steps after ``after`` (one step
    for every table, or one per table name: attribution may be flushed ahead of the others)."""
    tables = (("layers", run.layers, "layer"), ("blocks", run.blocks, "block"),
              ("attribution", run.attribution, "block"), ("scalars", run.scalars, None))
    for table, frame, key in tables:
        frame = frame[frame.step > (after.get(table, -1) if isinstance(after, dict) else after)]
        if frame.empty:
            continue
        stats = [c.name for c in columns(table) if c.name in frame.columns and c.name not in KEYS[table]]
        steps = frame.step.to_numpy()
        if key is None:
            names, prefixes = None, np.full(len(frame), "scalars/", object)
        else:
            names = frame[key].astype(str).to_numpy()
            prefix = {"layers": "", "blocks": "block.", "attribution": "attribution."}[table]
            prefixes = np.full(len(frame), prefix, object)
            if table == "layers":
                prefixes = np.where(frame.phase.to_numpy() == "eval", "eval." + prefix, prefix)
        for stat in stats:
            values = frame[stat].to_numpy(dtype=np.float64)
            for i in np.flatnonzero(np.isfinite(values)):
                tag = f"{prefixes[i]}{stat}" if names is None else f"{prefixes[i]}{stat}/{names[i]}"
                yield tag, float(values[i]), int(steps[i])


def writer_dir(logdir: Path, run: Run, overwrite: bool) -> Path:
    """``logdir/<run name>``, refused if an earlier export left events there (they would repeat)."""
    target = Path(logdir) / run.name
    old = sorted(target.glob(EVENT_GLOB)) if target.is_dir() else []
    if old and not overwrite:
        raise FileExistsError(f"{target} already holds TensorBoard events of an earlier export")
    for path in old:
        path.unlink()
    return target


def export(run_paths: Sequence[str | Path], logdir: str | Path, *, overwrite: bool = False) -> dict[str, int]:
    """Write each run's figures under ``logdir``; returns the number of scalars per run name."""
    runs = [load_run(path) for path in run_paths]  # every run read before anything is written
    targets = [writer_dir(Path(logdir), run, overwrite) for run in runs]
    written: dict[str, int] = {}
    for run, target in zip(runs, targets):
        with SummaryWriter(log_dir=str(target)) as writer:
            written[run.name] = _write(writer, run, after=-1)
    return written


def follow(run_paths: Sequence[str | Path], logdir: str | Path, *, interval: float = 2.0, overwrite: bool = False,
           timeout: float | None = None, say: Callable[[str], None] = lambda line: None) -> dict[str, int]:
    """Export the runs as they are written, until none is still running (or ``timeout`` seconds).

    Waits for runs that do not exist yet. Each pass reads every run again and writes the steps
    past those written before. Returns the number of scalars written per run name.
    """
    start = time.monotonic()
    pending = {Path(p): None for p in run_paths}  # path -> (writer, last step written per table) once it exists
    written: dict[str, int] = {}
    try:
        while True:
            running = False
            for path, state in pending.items():
                try:
                    run = load_run(path)
                except RunNotFoundError:
                    running = True  # not started yet
                    continue
                if state is None:
                    state = pending[path] = (SummaryWriter(log_dir=str(writer_dir(Path(logdir), run, overwrite))), {})
                    say(f"following {path} into {Path(logdir) / run.name}")
                if run.status != "running":  # its lock is checked now, the tables were read before:
                    run = load_run(path)  # read once more, all the writer wrote before it let go
                else:
                    running = True
                pending[path] = _write_new(state, run, written)
            if not running or (timeout is not None and time.monotonic() - start > timeout):
                return written
            time.sleep(interval)
    finally:
        for state in pending.values():
            if state is not None:
                state[0].close()


def _write_new(state: tuple[SummaryWriter, dict[str, int]], run: Run,
               written: dict[str, int]) -> tuple[SummaryWriter, dict[str, int]]:
    """Write ``run``'s steps past those written, table by table; the writer and the new last steps."""
    writer, last = state
    written[run.name] = written.get(run.name, 0) + _write(writer, run, after=last)
    writer.flush()
    tables = {"layers": run.layers, "blocks": run.blocks, "scalars": run.scalars, "attribution": run.attribution}
    return writer, {**last, **{name: int(t.step.max()) for name, t in tables.items() if len(t)}}


def _write(writer: SummaryWriter, run: Run, after: int | dict[str, int]) -> int:
    count = 0
    for tag, value, step in scalar_events(run, after):
        writer.add_scalar(tag, value, global_step=step)
        count += 1
    return count
