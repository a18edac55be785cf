"""What the ranks of a multi-process job say to each other: little, and never per step (everything
here runs at ``watch()``, at a flush or at ``close()``, on host copies the flush already made).

- At ``watch()``: one ``all_gather_object`` of each rank's settings and setup error, so that the
  ranks agree on the run (rank 0's path), refuse together when they differ (``every``, the
  layers), and none trains on when rank 0 could not open the run.
- At each flush: one ``gather`` to rank 0 of the flushed steps' statistics, accumulators and
  host counts packed in one float64 tensor (exact for counts below 2**53). Rank 0 merges them
  by the schema's rules (``rank_merge.merge_ranks``). Steps are those of the schedule, which every
  rank holds; a step only one rank holds (an evaluation logged off the schedule) is its own.
- At a failure: no collective (the other ranks may be stuck in the model's own); a rank that
  fails leaves a note in the job's key-value store (``torch.distributed``'s, which torchrun
  runs), and rank 0 names the failed ranks in meta.json when it closes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gradscope.recording.processes import Processes
from gradscope.store.rank_merge import merge_counts, merge_ranks
from gradscope.store.schema import BLOCK, COUNTS, LAYER, STEP, HostCounts


@dataclass
class RankSlots:
    """One rank's statistics of the exchanged steps, on the host (numpy)."""

    layer: np.ndarray  # [steps, phases, layers, LAYER.width]
    block: np.ndarray  # [steps, blocks, BLOCK.width]
    step: np.ndarray  # [steps, STEP.width]
    counts: HostCounts

    def put(self, k: int, source: RankSlots, i: int) -> None:
        """Slot ``k`` becomes ``source``'s slot ``i``: statistics and counts."""
        self.layer[k], self.block[k], self.step[k] = source.layer[i], source.block[i], source.step[i]
        for c in COUNTS:
            getattr(self.counts, c.name)[k] = getattr(source.counts, c.name)[i]


class Exchange:
    """The collectives of one recorder (see the module docstring); every call is made on every rank."""

    def __init__(self, processes: Processes) -> None:
        self.processes = processes
        self.collectives = 0  # made so far (tests count them per step)
        self.merged_below = 0  # steps below this were merged over the ranks (or are rank 0's own)
        self.run = ""  # the run's path, agreed at start: the key of failure notes
        self._device = _collective_device(processes)

    def connected(self) -> bool:
        """Whether the process group still exists (a program may destroy it before ``close()``)."""
        import torch.distributed as dist

        return dist.is_initialized()

    def start(self, facts: dict[str, Any], error: Exception | None, refused: Callable[[str | None], None]) -> str:
        """Rank 0's run path, once every rank is ready with the same settings (``facts``); else
        ``refused(problem)`` and raise on every rank (rank 0 its own ``error``, if it had one)."""
        try:
            ranks = self.agree(facts, None if error is None else f"{type(error).__name__}: {error}")
        except BaseException:
            refused(None)
            raise
        problem = disagreement(ranks)
        if problem is not None:
            refused(problem)
            if error is not None:
                raise error
            raise RuntimeError(f"gradscope.watch: {problem}")
        self.run = str(ranks[0]["facts"]["run"])
        return self.run

    def agree(self, facts: dict[str, Any], error: str | None) -> list[dict[str, Any]]:
        """Every rank's ``facts`` and setup ``error`` (None when it is ready), in rank order."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.processes.world_size
        dist.all_gather_object(gathered, {"facts": facts, "error": error}, group=self.processes.group)
        self.collectives += 1
        return gathered

    def gather(self, shared: list[int], steps: list[int], layer: Tensor, step: Tensor, block: Tensor,
               counts: HostCounts) -> list[RankSlots] | None:
        """Each rank's statistics of the ``shared`` steps (host copies ``layer``/``step``/``block``
        and ``counts`` of this rank's slots holding ``steps``), on rank 0; None elsewhere.

        A rank with no slot for a shared step sends it empty (all counts 0).
        """
        import torch.distributed as dist

        local = _select(shared, steps, layer, step, block, counts)
        packed = _pack(local).to(self._device)
        world = self.processes.world_size
        chunks = list(torch.empty(world * packed.numel(), dtype=torch.float64, device=self._device).chunk(world)) \
            if self.processes.writes else None
        self._wait(dist.gather(packed, chunks, dst=0, group=self.processes.group, async_op=True))
        self.collectives += 1
        if chunks is None:
            return None
        return [_unpack(c.cpu().numpy(), local) for c in chunks]

    def merge(self, limit: int, every: int, steps: list[int], layer: Tensor, step: Tensor, block: Tensor,
              counts: HostCounts, per_rank: bool) -> tuple[Any, ...] | None:
        """This rank's taken slots (host copies, ``steps``) with the scheduled steps below
        ``limit`` merged over the ranks (one collective), on rank 0; None elsewhere. Every rank
        passes the same ``limit`` and ``every``, so all exchange the same steps; slots off the
        schedule (evaluations, maybe one rank's) stay rank 0's own.

        Returns (steps, layer, step, block, counts, shared, by_rank): what a ``FlushJob`` takes.
        """
        shared = [s for s in range(self.merged_below, limit) if s % every == 0]
        self.merged_below = max(self.merged_below, limit)
        ranks = self.gather(shared, steps, layer, step, block, counts)
        if ranks is None:
            return None
        every_count = [r.counts for r in ranks]
        merged = RankSlots(merge_ranks(LAYER, [r.layer for r in ranks], every_count),
                           merge_ranks(BLOCK, [r.block for r in ranks], every_count),
                           merge_ranks(STEP, [r.step for r in ranks], every_count),
                           merge_counts(every_count))
        written = sorted(set(steps) | set(shared))
        mine = RankSlots(layer.numpy(), block.numpy(), step.numpy(), counts)
        out = _empty(len(written), merged)
        where_shared, where_mine = {s: k for k, s in enumerate(shared)}, {s: i for i, s in enumerate(steps)}
        for j, s in enumerate(written):
            out.put(j, *((merged, where_shared[s]) if s in where_shared else (mine, where_mine[s])))
        by_rank = [(r.layer, r.step, r.block, r.counts) for r in ranks] if per_rank else None
        return written, out.layer, out.step, out.block, out.counts, shared, by_rank

    def _wait(self, work: Any) -> None:
        """Wait for a collective, but stop waiting for a rank that failed: one that closed after an
        error never joins, and may stay alive (its sockets open) for long."""
        checked = time.monotonic()
        while not work.is_completed():
            time.sleep(0.0002)
            if time.monotonic() - checked > _FAILURE_POLL_SECONDS:
                checked = time.monotonic()
                failed = self.failures()
                if failed:
                    raise RuntimeError(f"gradscope: stopped waiting for the other ranks: {'; '.join(failed)}")
        work.wait()  # the collective's own error, if it had one

    # ------------------------------------------------------------------ failures

    def close_alone(self, status: str, held_steps: list[int], failure: str | None, lost: list[str]
                    ) -> tuple[str, int]:
        """A recorder closing after an error or an interruption: no collective (the others may be
        stuck in the model's own, or gone), so unmerged steps are lost, and said to be (in
        ``lost``). A failed rank tells rank 0, which names it. Returns the status and the slots
        left to write (none: every slot held is of a step not merged)."""
        held = [step for step in held_steps if step >= self.merged_below]
        if held:
            why = status if self.connected() else "after the process group was destroyed"
            lost.append(f"steps {held[0]}-{held[-1]} not written: they are merged over the ranks at a flush, "
                        f"and rank {self.processes.rank} closed ({why}) before one")
            status = "failed" if status == "finished" else status
        if status == "failed":
            self.note_failure(failure or "failed")
        if self.processes.writes:
            notes = self.failures()
            lost.extend(notes)
            status = "failed" if notes else status
        return status, 0

    def note_failure(self, message: str) -> None:
        """Tell the other ranks (through the job's store) that this one failed; best effort."""
        with _job_store() as store:
            if store is not None:
                store.set(_failure_key(self.run, self.processes.rank), message[:2000])

    def failures(self) -> list[str]:
        """The notes of the other ranks that failed (none when the store cannot be reached)."""
        out = []
        with _job_store() as store:
            for rank in range(self.processes.world_size) if store is not None else ():
                key = _failure_key(self.run, rank)
                if rank != self.processes.rank and store.check([key]):
                    out.append(f"rank {rank} failed: {store.get(key).decode(errors='replace')}")
        return out


def disagreement(ranks: list[dict[str, Any]]) -> str | None:
    """What keeps the ranks of a job from recording one run (from ``Exchange.agree``): a rank's
    setup error, or settings that differ from rank 0's (the run path may differ: rank 0's is used)."""
    errors = [f"rank {r}: {info['error']}" for r, info in enumerate(ranks) if info["error"]]
    if errors:
        return "the ranks could not all start recording: " + "; ".join(errors)
    first = ranks[0]["facts"]
    for r, info in enumerate(ranks[1:], start=1):
        differ = sorted(k for k in first if k != "run" and info["facts"].get(k) != first[k])
        if differ:
            return (f"rank {r}'s {', '.join(differ)} differ from rank 0's: call watch() with the same "
                    "arguments on the same model on every rank")
    return None


def _empty(n: int, like: RankSlots) -> RankSlots:
    return RankSlots(np.zeros((n, *like.layer.shape[1:])), np.zeros((n, *like.block.shape[1:])),
                     np.zeros((n, *like.step.shape[1:])), HostCounts(n, like.counts.layers, like.counts.blocks))


def _failure_key(run: str, rank: int) -> str:
    return f"gradscope/{run}/failed/{rank}"


_FAILURE_POLL_SECONDS = 1.0


@contextlib.contextmanager
def _job_store() -> Iterator[Any]:
    """The job's key-value store with a short timeout (restored after), or None where there is
    none; its errors (a host gone) end the block quietly: failure notes are best effort."""
    try:
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        old = store.timeout
    except Exception:
        yield None
        return
    store.set_timeout(timedelta(seconds=5))
    try:
        yield store
    except Exception:
        pass
    finally:
        with contextlib.suppress(Exception):
            store.set_timeout(old)


def _collective_device(processes: Processes) -> torch.device:
    """NCCL moves CUDA tensors only; every other backend (gloo) takes host tensors."""
    if processes.backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _select(shared: list[int], steps: list[int], layer: Tensor, step: Tensor, block: Tensor,
            counts: HostCounts) -> RankSlots:
    """This rank's slots of the ``shared`` steps, empty where it holds none."""
    where = {s: i for i, s in enumerate(steps)}
    mine = RankSlots(layer.numpy(), block.numpy(), step.numpy(), counts)  # host copies: no device read
    out = _empty(len(shared), mine)
    for k, s in enumerate(shared):
        if s in where:
            out.put(k, mine, where[s])
    return out


def _pack(slots: RankSlots) -> Tensor:
    parts = [slots.layer.ravel(), slots.block.ravel(), slots.step.ravel()]
    parts += [getattr(slots.counts, c.name).astype(np.float64).ravel() for c in COUNTS]
    return torch.from_numpy(np.concatenate(parts))


def _unpack(flat: np.ndarray, like: RankSlots) -> RankSlots:
    """A packed rank's slots, shaped as ``like`` (every rank packs the same shapes)."""
    at = 0

    def take(shape: tuple[int, ...]) -> np.ndarray:
        nonlocal at
        size = int(np.prod(shape))
        out = flat[at:at + size].reshape(shape)
        at += size
        return out

    layer, block, step = (take(a.shape) for a in (like.layer, like.block, like.step))
    counts = HostCounts(0, like.counts.layers, like.counts.blocks)
    counts.slots = like.counts.slots
    for c in COUNTS:
        template = getattr(like.counts, c.name)
        setattr(counts, c.name, take(template.shape).astype(template.dtype))
    return RankSlots(layer, block, step, counts)
