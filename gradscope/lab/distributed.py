"""The trainer under torchrun: which process this is, its device, its share of each batch, and
the process group it trains in.

torchrun (``torch.distributed.run``) starts one process per device and tells each its place in
the environment: ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``.
A process that sees more than one process in its job trains data-parallel (DDP); one that sees
none, or only itself, trains alone exactly as without torchrun.

Every process draws the same global batch (the same seed) and trains on its slice of it, so the
processes together see the batches of a one-process run of the same batch size, and DDP's mean
of the processes' gradients is the gradient of the global batch's mean loss.
"""

from __future__ import annotations

import atexit
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one training job."""

    rank: int  # global rank; 0 prints progress (and is the one watch() lets write the run)
    local_rank: int  # rank on this machine: the CUDA device this process trains on
    size: int  # processes in the job


def from_env(environ: Mapping[str, str] | None = None) -> World | None:
    """This process's place in a multi-process job, or None when it trains alone.

    A process group the caller already initialised decides; otherwise torchrun's variables.
    ``WORLD_SIZE`` of 1 (``torchrun --nproc-per-node 1``) is training alone.
    """
    env = os.environ if environ is None else environ
    if environ is None and torch.distributed.is_available() and torch.distributed.is_initialized():
        size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    elif "WORLD_SIZE" in env:
        size = _count(env, "WORLD_SIZE", env["WORLD_SIZE"])
        rank = _count(env, "RANK", env.get("RANK", "")) if size > 1 else 0
    else:
        return None
    if size <= 1:
        return None
    if not rank < size:
        raise ValueError(f"RANK={rank} is not below WORLD_SIZE={size}: this process is in no place of the job")
    return World(rank, _count(env, "LOCAL_RANK", env.get("LOCAL_RANK", "0")), size)


def _count(env: Mapping[str, str], name: str, raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0 or (name == "WORLD_SIZE" and value == 0):
        what = "count" if name == "WORLD_SIZE" else "rank"
        raise ValueError(f"{name}={raw!r} in the environment is not a process {what} "
                         "(torchrun sets it; unset it to train in one process)")
    return value


def share(batch: int, processes: int) -> int:
    """The batch each of ``processes`` trains on, for a global batch of ``batch`` samples.

    Refused unless it divides evenly: DDP averages the processes' gradients with equal weights,
    which is the global batch's gradient only when every process holds as many samples.
    """
    if processes <= 1:
        return batch
    if batch < processes or batch % processes:
        fits = max(processes, batch // processes * processes)
        raise ValueError(f"a batch of {batch} samples does not split evenly over {processes} processes: "
                         f"choose a batch size that is a multiple of {processes} (such as {fits})")
    return batch // processes


def slice_of(x: Any, y: Tensor, world: World) -> tuple[Any, Tensor]:
    """``world.rank``'s contiguous slice of a global batch (inputs a tensor or a tuple of them)."""
    size = len(y) // world.size
    part = slice(world.rank * size, (world.rank + 1) * size)
    return (tuple(t[part] for t in x) if isinstance(x, tuple) else x[part]), y[part]


def device_for(device: torch.device, world: World) -> torch.device:
    """The device this process trains on: the CPU, or CUDA device ``LOCAL_RANK`` (one per process)."""
    if device.type != "cuda":
        return device
    if device.index is not None and device.index != world.local_rank:
        raise ValueError(f"device {device} was asked for, but under torchrun each process trains on the CUDA device of "
                         f"its LOCAL_RANK (here cuda:{world.local_rank}): ask for 'cuda' or 'auto'")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise ValueError(f"LOCAL_RANK={world.local_rank} has no CUDA device: this machine has {count}; "
                         "start at most as many processes per machine as it has GPUs")
    return torch.device("cuda", world.local_rank)


def check_launch(device: torch.device, processes: int) -> None:
    """Refuse, before starting ``processes`` processes here, a device they cannot share out."""
    if processes <= 1 or device.type != "cuda":
        return
    if device.index is not None:
        raise ValueError(f"with several processes each trains on its own CUDA device; ask for 'cuda', not {device}")
    count = torch.cuda.device_count()
    if processes > count:
        raise ValueError(f"{processes} processes on CUDA need {processes} GPUs; this machine has {count} "
                         "(or train on the CPU with --device cpu)")


def wrap(model: nn.Module, device: torch.device, world: World | None) -> nn.Module:
    """``model`` in DDP, in the default process group (formed if need be); ``model`` itself when
    training alone. DDP starts every process from rank 0's weights and buffers."""
    if world is None:
        return model
    join(device, world)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def join(device: torch.device, world: World) -> None:
    """Form the default process group from torchrun's variables (gloo on the CPU, NCCL on CUDA),
    unless there is one, and keep it until the process exits.

    Kept, not destroyed after a run: under torchrun a default group formed again after one was
    destroyed waits forever (it finds the old group's addresses in torchrun's store), so a second
    ``train`` in the same process joins the first one's group. A group the caller formed is the
    caller's to destroy.
    """
    dist = torch.distributed
    if not dist.is_available():
        raise RuntimeError("this PyTorch has no torch.distributed, so it cannot train in several processes")
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # bound to its device where PyTorch allows (2.3 on): NCCL then need not guess it
        bound = {"device_id": device} if "device_id" in inspect.signature(dist.init_process_group).parameters else {}
        dist.init_process_group("nccl", **bound)
    else:
        dist.init_process_group("gloo")
    atexit.register(_leave)


def _leave() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def mean_over_processes(*values: Tensor) -> Tensor:
    """The mean of each scalar over the processes (one collective): what DDP trains on."""
    stacked = torch.stack([v.detach().float() for v in values])
    torch.distributed.all_reduce(stacked)  # SUM: gloo has no AVG
    return stacked / torch.distributed.get_world_size()
