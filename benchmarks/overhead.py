"""Training-step overhead and peak memory of gradscope and of the tools people use today.

Every variant trains its own copy of the same model, all attached at once, in interleaved blocks
of 10 consecutive steps (block b of each variant back to back, in an order that rotates with b),
so a stall of the machine lasting seconds hits them alike while each still trains as it would
alone, step after step:

- ``none``: no instrumentation;
- ``empty hooks``: gradscope's hooks on the same modules doing nothing, the floor of any
  recorder built on module hooks (not a tool);
- ``gradscope every=1`` / ``every=10``: every per-layer and block metric on;
- ``naive hooks``: the common forum recipe, a forward hook per module taking ``.item()``
  statistics of its output, and ``p.grad.norm().item()`` per parameter after backward;
- ``wandb.watch(log="all", log_freq=1)`` in offline mode, when wandb is installed;
- ``tensorboard``: ``SummaryWriter.add_histogram`` of every gradient each step, when installed.

Each step is divided by the uninstrumented copy's step at the same place in the same block (the
first step of a block runs on caches the other copies cooled, so only like is compared with
like). The printed ratio is the median of these for ``every=1`` and the peers; for the sampled
``every=10`` schedule it is the mean over its period, (recorded + 9 x others) / 10, with the
median over the recorded steps and over the others (``schedule_mean``), since a median over all
steps would hide the recorded step's cost. The recorded step is each block's 6th. Step times in
milliseconds are summarised the same way.

Peak memory is a block's working set, the median over blocks: on CUDA ``max_memory_allocated``
above the memory allocated before the block; on Linux CPUs the peak RSS (VmHWM, reset through
/proc/self/clear_refs) above the RSS before it, measured in a child
process whose malloc returns every block of 64 KiB or more to the system on free
(``MALLOC_MMAP_THRESHOLD_``), so RSS follows the live tensors (its times are not used).

Beside each workload it prints gradscope ``every=1``'s ratio minus the empty hooks' of the same
run: what its statistics cost above the floor of any module-hook recorder, the measure for
launch-bound eager GPU steps. The script also prints the fixed cost per watched layer on tiny
tensors (the launch-bound regime of small GPU steps, measurable on any machine) and times
``load_run`` on a 10,000-step resnet110 run.

With ``--nproc N`` (N > 1) it times data-parallel training instead: N gloo processes on this
machine's CPUs, each with ``--threads`` (default 1) intra-op threads, each training every
variant's own copy of the model wrapped in its own ``DistributedDataParallel`` on its 1/N of the
batch, interleaved and divided as above (a barrier before each block). A DDP step's time is
the slowest rank's time for that step (max over ranks; rank 0's own ratio is printed too).
Beside each DDP ratio it prints the single-process ratio of the same model and per-rank batch
at the same thread count, measured first in the launching process, so "DDP ratio <= single-process
ratio + 0.03" reads off one table. The variants default to gradscope every=1 and every=10,
watched on every rank with the same run path (``--variants`` picks among empty hooks, naive
hooks and these); memory, the fixed cost and ``load_run`` are not measured. Every process is
stopped when one fails, after ``--timeout`` seconds, or when the launcher exits.

    python benchmarks/overhead.py [--device cpu|cuda] [--steps 100] [--only resnet20,pre-LN]
                                  [--variants every,naive] [--skip-memory] [--skip-load]
    python benchmarks/overhead.py --nproc 2 --only resnet20 [--steps 90] [--threads 1] [--timeout 1200]
    python benchmarks/overhead.py --compile [reduce-overhead] [--only resnet20] [--steps 100]

With ``--compile`` it times compiled steps instead (``compiled_overhead.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.metadata
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import gradscope
from gradscope import models
from gradscope.recording.batching import enabled as batching_enabled

sys.path.insert(0, str(Path(__file__).resolve().parent))


# ------------------------------------------------------------------------------------ workloads

def _transformer(depth: int, d: int, seq: int, vocab: int = 256) -> nn.Module:
    return models.create("transformer_lm_pre", depth=depth, d_model=d, d_ff=4 * d, heads=max(4, d // 64),
                         seq_len=seq, vocab_size=vocab)


def _resnet50() -> nn.Module:
    from imagenet_resnet import ResNet50  # beside this file

    return ResNet50()


GPT2_VOCAB = 50257


# name -> (model factory, batch maker(device), autocast dtype or None)
CPU_WORKLOADS: dict[str, tuple[Callable[[], nn.Module], Callable[[torch.device], Any], Any]] = {
    "resnet20 b64": (lambda: models.create("resnet20"),
                     lambda d: (torch.randn(64, 3, 32, 32, device=d), torch.randint(0, 10, (64,), device=d)), None),
    "pre-LN 6x128 b32": (lambda: _transformer(6, 128, 64),
                         lambda d: (torch.randint(0, 256, (32, 64), device=d),
                                    torch.randint(0, 256, (32, 64), device=d)), None),
}
CUDA_WORKLOADS = {
    "resnet56 b128": (lambda: models.create("resnet56"),
                      lambda d: (torch.randn(128, 3, 32, 32, device=d), torch.randint(0, 10, (128,), device=d)), None),
    "pre-LN 12x512 b32 bf16": (lambda: _transformer(12, 512, 256),
                               lambda d: (torch.randint(0, 256, (32, 256), device=d),
                                          torch.randint(0, 256, (32, 256), device=d)), torch.bfloat16),
    # compute-bound, as users train them: a GPT-2-small-sized LM and a ResNet-50-sized CNN
    "gpt2-small s1024 b8 bf16": (lambda: _transformer(12, 768, 1024, GPT2_VOCAB),
                                        lambda d: (torch.randint(0, GPT2_VOCAB, (8, 1024), device=d),
                                                   torch.randint(0, GPT2_VOCAB, (8, 1024), device=d)), torch.bfloat16),
    "resnet50 224 b128 bf16": (_resnet50,
                               lambda d: (torch.randn(128, 3, 224, 224, device=d),
                                          torch.randint(0, 1000, (128,), device=d)), torch.bfloat16),
}


# ------------------------------------------------------------------------------------ variants

class Variant:
    """Attaches one way of monitoring to a model for a batch of steps."""

    name = ""
    period = 1  # a schedule recording one step in ``period``: each period's mean step counts

    @contextlib.contextmanager
    def attach(self, model: nn.Module, opt: torch.optim.Optimizer, tmp: Path) -> Iterator[Callable[[Any], None]]:
        yield lambda loss: None


class Nothing(Variant):
    name = "none"


class Gradscope(Variant):
    def __init__(self, every: int) -> None:
        self.every, self.name, self.period = every, f"gradscope every={every}", every
        self.run_name: str | None = None  # set where every process must name the same run (DDP)

    @contextlib.contextmanager
    def attach(self, model, opt, tmp):
        path = tmp / (self.run_name or f"gradscope-{time.monotonic_ns()}")
        with gradscope.watch(model, path, optimizer=opt, every=self.every) as rec:
            yield lambda loss: rec.step(loss=loss)


class GradscopeUnbatched(Gradscope):
    """gradscope every=1 with the GPU's batched reductions off: each tensor reduced by its own ops."""

    def __init__(self) -> None:
        super().__init__(1)
        self.name = "gradscope every=1, unbatched"

    @contextlib.contextmanager
    def attach(self, model, opt, tmp):
        from gradscope.recording import kernels

        kernels.MODE = "off"  # read when the recorder is made
        try:
            with super().attach(model, opt, tmp) as after_backward:
                kernels.MODE = None
                yield after_backward
        finally:
            kernels.MODE = None


@contextlib.contextmanager
def _removed_after(handles: list[Any]) -> Iterator[None]:
    """Remove hook handles when the block ends, however it ends."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class EmptyHooks(Variant):
    """The floor of any hook-based recorder: gradscope's hooks on the same modules, doing nothing.

    A forward hook on every module gradscope watches, a gradient hook on each output, and a
    pre-hook and hook on every block, none of which touches a tensor. What gradscope costs
    above this is its statistics; this itself is Python calls and autograd hook dispatch.
    """

    name = "empty hooks (floor, not a tool)"

    @contextlib.contextmanager
    def attach(self, model, opt, tmp):
        from gradscope.recording.blocks import select_blocks
        from gradscope.recording.layers import select_layers
        from gradscope.recording.probes import on_gradient

        def grad_hook(grad_outputs: tuple[Any, ...]) -> None:
            return None

        def forward_hook(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, torch.Tensor) and out.grad_fn is not None:
                on_gradient(out, grad_hook)  # gradscope's way of hooking dL/dy

        def pre_hook(module: nn.Module, args: Any) -> None:
            return None

        handles = [m.register_forward_hook(forward_hook) for _, m in select_layers(model) if isinstance(m, nn.Module)]
        for _, block, _ in select_blocks(model, None):
            handles += [block.register_forward_pre_hook(pre_hook), block.register_forward_hook(forward_hook)]
        with _removed_after(handles):
            yield lambda loss: None


class NaiveHooks(Variant):
    """Forward hook per parameterised module with .item() statistics; per-parameter grad norms."""

    name = "naive hooks"

    @contextlib.contextmanager
    def attach(self, model, opt, tmp):
        log: dict[str, float] = {}

        def hook(name: str) -> Callable[..., None]:
            def record(module: nn.Module, args: Any, out: Any) -> None:
                if isinstance(out, torch.Tensor) and out.is_floating_point():
                    y = out.detach().float()
                    log[name + ".mean"] = y.mean().item()
                    log[name + ".std"] = y.std().item()
                    log[name + ".absmax"] = y.abs().max().item()
                    log[name + ".zero_frac"] = (y == 0).float().mean().item()
            return record

        handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
                   if next(m.parameters(recurse=False), None) is not None]

        def after_backward(loss: torch.Tensor) -> None:
            for n, p in model.named_parameters():
                if p.grad is not None:
                    log[n + ".grad_norm"] = p.grad.norm().item()
            log["loss"] = loss.item()

        with _removed_after(handles):
            yield after_backward


class WandbWatch(Variant):
    name = 'wandb.watch(log="all", log_freq=1)'

    @contextlib.contextmanager
    def attach(self, model, opt, tmp):
        import wandb

        run = wandb.init(mode="offline", dir=str(tmp), project="gradscope-overhead", reinit="finish_previous")
        run.watch(model, log="all", log_freq=1)
        try:
            yield lambda loss: run.log({"loss": loss.item()})
        finally:
            run.unwatch(model)
            run.finish()


class TensorBoardHistograms(Variant):
    name = "tensorboard add_histogram"

    @contextlib.contextmanager
    def attach(self, model, opt, tmp):
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tmp / f"tb-{time.monotonic_ns()}"))
        step = [0]

        def after_backward(loss: torch.Tensor) -> None:
            for n, p in model.named_parameters():
                if p.grad is not None:
                    writer.add_histogram(n + ".grad", p.grad, step[0])
            writer.add_scalar("loss", loss, step[0])
            step[0] += 1

        try:
            yield after_backward
        finally:
            writer.close()


def variants(only: str | None = None) -> list[Variant]:
    """Every variant whose tools are installed; ``only``: comma-separated name fragments (none is kept)."""
    out: list[Variant] = [Nothing(), EmptyHooks(), Gradscope(1), Gradscope(10), NaiveHooks()]
    if torch.cuda.is_available() and batching_enabled(torch.device("cuda")):
        out.insert(3, GradscopeUnbatched())  # what the batched kernels save, in the same run
    for module, cls in (("wandb", WandbWatch), ("tensorboard", TensorBoardHistograms)):
        try:
            __import__(module)
        except ImportError:
            continue
        out.append(cls())
    if only:
        wanted = [w.strip() for w in only.split(",")]
        out = [v for v in out if v.name == "none" or any(w in v.name for w in wanted)]
    return out


# ------------------------------------------------------------------------------------ measuring

class PeakMemory:
    """Peak extra memory of a block of steps: CUDA allocator peak, or Linux peak RSS above the start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.available = device.type == "cuda" or Path("/proc/self/clear_refs").exists()

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.available:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._base = self._status("VmRSS")

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device) - self._base)
        return float(self._status("VmHWM") - self._base) if self.available else float("nan")

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0


def time_steps(model, opt, batch, steps, device, autocast, after_backward) -> list[float]:
    x, y = batch
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out = model(x)
        loss = F.cross_entropy(out.float().flatten(0, -2), y.flatten())
        loss.backward()
        after_backward(loss)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def schedule_mean(blocks: list[list[float]], period: int, offset: int = 0) -> float:
    """Mean per step of a schedule that records one step in ``period``, from robust parts.

    ``blocks`` hold per-step values (times or ratios); in each, the recorded steps are at
    positions ``offset``, ``offset + period``, .... The mean of one period is one recorded step
    plus ``period - 1`` others, each part the median over all blocks, so a stall during one step
    does not read as overhead (a median over all steps would hide the recorded step's cost).
    With ``period`` 1 it is the median over every step.
    """
    steps = [(i, x) for block in blocks for i, x in enumerate(block)]
    if period == 1:
        return statistics.median(x for _, x in steps)
    recorded = [x for i, x in steps if i % period == offset]
    others = [x for i, x in steps if i % period != offset]
    return (statistics.median(recorded) + (period - 1) * statistics.median(others)) / period


BLOCK = 10  # consecutive steps a variant runs before the next one's turn: one sampled period
RECORDED_AT = 5  # where in a block the sampled schedule's recorded step falls (not the cold first)


def bench_workload(name: str, spec: Any, device: torch.device, steps: int, tmp: Path,
                   only: str | None = None, chosen: list[Variant] | None = None) -> list[tuple]:
    """Times ``steps`` training steps of every variant, in interleaved blocks of ``BLOCK`` steps.

    Each variant trains its own copy of one model, all attached at once. Block b of every
    variant runs back to back (in an order that rotates with b), and each step is compared
    with the uninstrumented copy's step at the same place (see the module docstring), so a
    stall of the machine lasting seconds reads as no variant's overhead. ``chosen``: these
    variants (``none`` first) instead of those ``only`` selects.
    """
    make, make_batch, autocast = spec
    torch.manual_seed(0)
    template = make().to(device)
    batch = make_batch(device)
    all_variants = chosen if chosen is not None else variants(only)
    with contextlib.ExitStack() as stack:
        runners = []
        for v in all_variants:
            model = copy.deepcopy(template)
            opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
            runners.append(_attached(stack, v, model, opt, tmp, batch, device, autocast))
        blocks, peaks = interleave(runners, batch, steps, device, autocast, PeakMemory(device))
    return ratio_rows(name, all_variants, blocks, peaks)


Runner = tuple[Variant, nn.Module, torch.optim.Optimizer, Callable[[Any], None]]


def _attached(stack: contextlib.ExitStack, v: Variant, model: nn.Module, opt: torch.optim.Optimizer, tmp: Path,
              batch: Any, device: torch.device, autocast: Any) -> Runner:
    """Attach ``v`` to ``model`` (detached when ``stack`` closes) and warm it up."""
    after_backward = stack.enter_context(v.attach(model, opt, tmp))
    # warm-up: recorder steps 0..14, so each timed block's recorded step is its 6th
    time_steps(model, opt, batch, BLOCK + (BLOCK - RECORDED_AT), device, autocast, after_backward)
    return v, model, opt, after_backward


def interleave(runners: list[Runner], batch: Any, steps: int, device: torch.device, autocast: Any,
               memory: PeakMemory | None,
               before_block: Callable[[], None] | None = None) -> tuple[dict[str, list[list[float]]],
                                                                       dict[str, list[float]]]:
    """Step times (seconds) of each variant's blocks, and its peak memory per block (NaN without ``memory``).

    Block b of every runner back to back, in an order rotating with b; ``before_block`` runs
    untimed before each block (under DDP a barrier, so every process starts a block together).
    """
    blocks: dict[str, list[list[float]]] = {v.name: [] for v, *_ in runners}
    peaks: dict[str, list[float]] = {v.name: [] for v, *_ in runners}
    for b in range(max(1, steps // BLOCK)):
        shift = b % len(runners)
        for v, model, opt, after_backward in runners[shift:] + runners[:shift]:
            if before_block is not None:
                before_block()
            if memory is not None:
                memory.start()
            blocks[v.name].append(time_steps(model, opt, batch, BLOCK, device, autocast, after_backward))
            peaks[v.name].append(memory.stop() if memory is not None else float("nan"))
    return blocks, peaks


def ratio_rows(name: str, all_variants: list[Variant], blocks: dict[str, list[list[float]]],
               peaks: dict[str, list[float]]) -> list[tuple]:
    """(workload, variant, step ms, x time, peak MiB, x mem, note) per variant, from its blocks of step times."""
    rows = []
    base_m = statistics.median(peaks["none"])
    for v in all_variants:
        # step i of block b over the uninstrumented copy's step i of block b (same cache state)
        ratios = [[t / b for t, b in zip(ours, base)] for ours, base in zip(blocks[v.name], blocks["none"])]
        ratio = schedule_mean(ratios, v.period, RECORDED_AT)
        t, m = schedule_mean(blocks[v.name], v.period, RECORDED_AT), statistics.median(peaks[v.name])
        note = ""
        if v.period > 1:  # the two parts of the sampled schedule's mean
            recorded = statistics.median(r[i] for r in ratios for i in range(RECORDED_AT, len(r), v.period))
            others = statistics.median(x for r in ratios for i, x in enumerate(r) if i % v.period != RECORDED_AT)
            note = f" (rec x{recorded:.2f}, rest x{others:.2f})"
        rows.append((name, v.name, t * 1e3, ratio, m / 2**20, m / base_m if base_m > 0 else float("nan"), note))
    return rows


def above_floor(rows: list[tuple]) -> float | None:
    """``gradscope every=1``'s ratio minus the empty hooks' of the same run: what its statistics cost
    above the floor of any module-hook recorder (the target for launch-bound eager GPU steps)."""
    ratio = {r[1]: r[3] for r in rows}
    floor, ours = ratio.get(EmptyHooks.name), ratio.get(Gradscope(1).name)
    return None if floor is None or ours is None else ours - floor


def cpu_peaks_in_child(args: argparse.Namespace) -> dict[tuple[str, str], float]:
    """Run this script with ``--memory-child`` under an mmap-always malloc; its peaks by (workload, variant)."""
    import json
    import subprocess

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "--memory-child", "--device", "cpu", "--steps", "20",
           "--threads", str(args.threads)] + (["--only", args.only] if args.only else []) \
        + (["--variants", args.variants] if args.variants else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return {(w, v): m for w, v, m in rows}


def fixed_cost_per_layer(device: torch.device, tmp: Path, only: str | None = None,
                         layers: int = 100, steps: int = 100) -> list[tuple[str, float]]:
    """Microseconds each watched layer adds to a step when its tensors are tiny.

    A stack of ``layers`` Linear(8, 8) on a batch of 4: the kernels cost next to nothing, so what
    is left is what every hook call, op dispatch and kernel launch costs. On a GPU this is the
    regime of any small, launch-bound step; here it can be measured without one.
    """
    make = lambda: nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])  # noqa: E731
    batch = (torch.randn(4, 8, device=device), torch.randint(0, 8, (4,), device=device))
    spec = (make, lambda d: batch, None)
    rows = bench_workload("fixed", spec, device, steps, tmp, only)
    base = next(r[2] for r in rows if r[1] == "none")
    return [(r[1], (r[2] - base) * 1e3 / layers) for r in rows if r[1] != "none"]


def time_load_run(tmp: Path, steps: int = 10_000) -> tuple[float, int]:
    """Seconds to load a synthetic resnet110 run of ``steps`` recorded steps (report_scale's layout)."""
    from report_scale import synthesise, template_run

    template_run(tmp / "template")
    synthesise(tmp / "template", tmp / "resnet110-10k", steps, seed=0)
    gradscope.load_run(tmp / "resnet110-10k")  # warm the file cache, as a second look at a run would
    start = time.perf_counter()
    run = gradscope.load_run(tmp / "resnet110-10k")
    return time.perf_counter() - start, len(run.layers)


def time_nonfinite_check(steps: int = 50, layers: int = 200) -> float:
    """Milliseconds the first-non-finite check costs at one flush of ``steps`` recorded steps of
    ``layers`` layers: numpy on the host over the flushed statistics, no device work at all
    (``recording.nonfinite``; the gradscope variants above include it at their flushes)."""
    import numpy as np

    from gradscope.recording.layers import Layer
    from gradscope.recording.nonfinite import first_nonfinite
    from gradscope.store.schema import LAYER, HostCounts

    counts = HostCounts(steps, layers)
    counts.act_n[:], counts.grad_n[:], counts.grad_rows[:] = 10, 10, True
    host = np.random.default_rng(0).random((steps, 2, layers, LAYER.width), dtype=np.float32)
    table = [Layer(f"l{i}", "Linear", 1, i) for i in range(layers)]
    start = time.perf_counter()
    for _ in range(20):
        first_nonfinite(list(range(steps)), host, counts, list(range(layers)), table)
    return (time.perf_counter() - start) / 20 * 1e3


# ------------------------------------------------------------------------------------ several processes

DDP_VARIANTS = "gradscope every="  # default under --nproc: none against gradscope every=1 and every=10


def ddp_variants(only: str | None) -> list[Variant]:
    """The variants compared under DDP (and by the single-process run beside it): ``none`` first.

    Tools that would write once per process (wandb, tensorboard) are left out; ``only`` picks
    among none, empty hooks, gradscope every=1 / every=10 and naive hooks (default: gradscope).
    """
    wanted = [w.strip() for w in (only or DDP_VARIANTS).split(",")]
    out = [Nothing(), EmptyHooks(), Gradscope(1), Gradscope(10), NaiveHooks()]
    return [v for v in out if v.name == "none" or any(w in v.name for w in wanted)]


def rank_part(batch: Any, rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """Process ``rank``'s share of ``batch``: its ``rank``-th of ``world`` slices along the batch dimension."""
    return tuple(t.tensor_split(world)[rank] for t in batch)


def per_rank_spec(spec: Any, rank: int, world: int) -> Any:
    make, make_batch, autocast = spec
    return make, lambda d: rank_part(make_batch(d), rank, world), autocast


# a workload of next to no compute for smoke tests: only run when ``--only`` names it
SMOKE_WORKLOADS = {
    "smoke mlp b8": (lambda: nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)),
                     lambda d: (torch.randn(8, 8, device=d), torch.randint(0, 4, (8,), device=d)), None),
}


def selected(workloads: dict[str, Any], only: str | None) -> dict[str, Any]:
    """The workloads whose name contains one of ``only``'s comma-separated fragments (all of
    ``workloads`` without it; smoke ones only by name)."""
    if not only:
        return dict(workloads)
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    return {name: spec for name, spec in {**workloads, **SMOKE_WORKLOADS}.items() if any(w in name for w in wanted)}


def ddp_worker(args: argparse.Namespace) -> None:
    """One process of the ``--nproc`` run (rank and rendezvous from the environment, as torchrun sets them).

    Every variant trains its own copy of the model in its own ``DistributedDataParallel`` on
    this process's share of the batch, interleaved as in the single-process run, with a barrier
    before each block. Rank 0 gathers every rank's step times and writes the rows to
    ``--ddp-result`` as JSON: ratios of each step's slowest rank ("max") and of rank 0 alone.
    """
    import faulthandler
    import json
    from datetime import timedelta

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    faulthandler.enable()  # a rank that aborts in C++ still shows its Python stack in the launcher's report
    device = torch.device("cpu")
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.collective_timeout))
    rank, world = dist.get_rank(), dist.get_world_size()

    def progress(what: str) -> None:
        print(f"rank {rank} {time.strftime('%H:%M:%S')}: {what}", flush=True)

    out: dict[str, dict[str, list]] = {}
    try:
        for w, (name, spec) in enumerate(selected(CPU_WORKLOADS, args.only).items()):
            make, make_batch, autocast = per_rank_spec(spec, rank, world)
            torch.manual_seed(0)  # the same template everywhere (DDP broadcasts rank 0's anyway)
            template = make().to(device)
            batch = make_batch(device)
            chosen = ddp_variants(args.variants)
            for v in chosen:
                if isinstance(v, Gradscope):  # every rank passes the same run path
                    v.run_name = f"gradscope-ddp-{w}-every{v.every}"
            with contextlib.ExitStack() as stack:
                runners = []
                for v in chosen:
                    model = DistributedDataParallel(copy.deepcopy(template))
                    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                    runners.append(_attached(stack, v, model, opt, Path(args.ddp_tmp), batch, device, autocast))
                progress(f"{name}: attached and warmed up")
                blocks, _ = interleave(runners, batch, args.steps, device, autocast, None, dist.barrier)
                progress(f"{name}: timed; closing")
            del runners, model, opt  # every DDP (and its reducer) gone before the process group
            progress(f"{name}: closed")
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, blocks)
            if rank == 0:
                slowest = {v: [[max(ts) for ts in zip(*(g[v][b] for g in gathered))] for b in range(len(bs))]
                           for v, bs in blocks.items()}
                nans = {v.name: [float("nan")] for v in chosen}
                out[name] = {"max": ratio_rows(name, chosen, slowest, nans),
                             "rank0": ratio_rows(name, chosen, blocks, nans)}
            dist.barrier()
        if rank == 0:
            Path(args.ddp_result).write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()
    progress("done")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In a child, before exec: be killed when the launching process dies (Linux), so none outlives it."""
    import ctypes
    import signal

    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def launch_ddp(args: argparse.Namespace, tmp: Path) -> dict[str, dict[str, list]]:
    """Run ``--nproc`` gloo processes of this script on this machine; rank 0's rows by workload.

    Raises SystemExit with every rank's last output when a process fails or ``--timeout`` passes;
    every process still running is then terminated (killed 5 s later), as on success or Ctrl-C.
    A process that fails after it said "done" (in the interpreter's teardown, past the process
    group) is reported on stderr and does not void the measurement.
    """
    import json
    import subprocess

    result = tmp / "ddp-result.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", "--steps", str(args.steps),
           "--threads", str(args.threads), "--ddp-tmp", str(tmp), "--ddp-result", str(result),
           "--collective-timeout", str(args.timeout)] \
        + (["--only", args.only] if args.only else []) + (["--variants", args.variants] if args.variants else [])
    base_env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                "WORLD_SIZE": str(args.nproc), "LOCAL_WORLD_SIZE": str(args.nproc),
                "OMP_NUM_THREADS": str(args.threads)}
    logs = [tmp / f"rank{r}.log" for r in range(args.nproc)]
    procs: list[subprocess.Popen] = []
    deadline = time.monotonic() + args.timeout
    failure = None

    def said_done(r: int) -> bool:
        return any(line.startswith(f"rank {r} ") and line.endswith(": done")
                   for line in logs[r].read_text(errors="replace").splitlines())

    try:
        for r, log in enumerate(logs):
            with open(log, "wb") as f:  # the child holds its own descriptor
                procs.append(subprocess.Popen(cmd, env={**base_env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                              stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                              preexec_fn=_die_with_parent if sys.platform == "linux" else None))
        while failure is None:
            codes = [p.poll() for p in procs]
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0) and not said_done(r)]
            if not bad and all(c is not None for c in codes):
                break
            if bad:
                failure = f"rank {bad[0][0]} exited with status {bad[0][1]}"
            elif time.monotonic() > deadline:
                failure = f"timed out after {args.timeout:.0f} s (--timeout)"
            else:
                time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if failure is not None:
        tails = "\n".join(f"--- rank {r} (last 30 lines) ---\n"
                          + "\n".join(log.read_text(errors="replace").splitlines()[-30:])
                          for r, log in enumerate(logs))
        raise SystemExit(f"DDP benchmark failed: {failure}; every process was stopped.\n{tails}")
    for r, p in enumerate(procs):
        if p.returncode:
            tail = "\n".join(logs[r].read_text(errors="replace").splitlines()[-10:])
            print(f"warning: rank {r} exited with status {p.returncode} after it was done:\n{tail}", file=sys.stderr)
    if not result.exists():
        raise SystemExit(f"DDP benchmark failed: every process exited but rank 0 wrote no {result.name}")
    return json.loads(result.read_text())


def main_ddp(args: argparse.Namespace) -> None:
    """``--nproc N``: the DDP ratios beside the single-process ratios of the same model and per-rank batch."""
    torch.set_num_threads(args.threads)
    n, workloads = args.nproc, selected(CPU_WORKLOADS, args.only)
    print(f"device: cpu, DDP over gloo: {n} processes x {args.threads} thread(s) on {os.cpu_count()} CPU cores; "
          f"single-process comparison: 1 process x {args.threads} thread(s), the same model and per-rank batch; "
          f"{versions()}")
    print(f"timed steps per variant {args.steps}, interleaved in blocks of {BLOCK} (a barrier before each DDP "
          f"block); DDP step = the slowest rank's time for that step (max over ranks), 'x rank 0' = rank 0's alone")
    print("target: DDP x time <= single-process x time + 0.03")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        single = {name: bench_workload(name, per_rank_spec(spec, 0, n), torch.device("cpu"), args.steps,
                                       Path(tmp), chosen=ddp_variants(args.variants))
                  for name, spec in workloads.items()}
        single_s = time.perf_counter() - start
        ddp = launch_ddp(args, Path(tmp))
    print(f"{'workload':24} {'variant':40} {'1 proc ms':>9} {'x time':>7} {f'DDP{n} ms':>9} {'x time':>7} "
          f"{'x rank 0':>8} {'DDP-1proc':>9}")
    for name in workloads:
        per_rank = f"{name} (b{rank_part(workloads[name][1](torch.device('cpu')), 0, n)[0].shape[0]}/rank)"
        for one, slow, r0 in zip(single[name], ddp[name]["max"], ddp[name]["rank0"]):
            diff = slow[3] - one[3]
            verdict = "" if one[1] == "none" else " ok" if diff <= 0.03 else " OVER"
            print(f"{per_rank:24} {one[1]:40} {one[2]:9.2f} {one[3]:7.3f} {slow[2]:9.2f} {slow[3]:7.3f} {r0[3]:8.3f} "
                  f"{diff:+9.3f}{verdict}")
            notes = [f"{label} {row[6].strip()}" for label, row in (("1 proc", one), ("DDP", slow)) if row[6]]
            if notes:
                print(f"{'':24} {'':40} " + "; ".join(notes))
    print(f"wall time: single-process {single_s:.0f} s, DDP {time.perf_counter() - start - single_s:.0f} s")


def versions() -> str:
    out = []
    for package in ("torch", "gradscope", "wandb", "tensorboard", "pyarrow", "pandas"):
        try:
            out.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(f"{package} not installed")
    return ", ".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; cpu with --nproc)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per variant (default 100; 90 with --nproc: each of its 3 default variants "
                             "first in 3 of the 9 blocks)")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads per process (default 2; 1 with --nproc)")
    parser.add_argument("--nproc", type=int, default=1,
                        help="N > 1: time DDP over N gloo CPU processes (gradscope variants only, by default) "
                             "beside one process on the same per-rank batch")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="with --nproc: seconds before every process is stopped")
    parser.add_argument("--only", default=None,
                        help="run workloads whose name contains this (comma-separated: any of these)")
    parser.add_argument("--variants", default=None, help="comma-separated fragments of variant names to run")
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                        help="time torch.compile'd steps (Inductor, this mode) with gradscope against without it "
                             "(benchmarks/compiled_overhead.py)")
    parser.add_argument("--skip-load", action="store_true", help="skip the load_run timing")
    parser.add_argument("--skip-fixed", action="store_true", help="skip the per-layer fixed cost")
    parser.add_argument("--skip-memory", action="store_true", help="skip the CPU peak-memory child")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ddp-tmp", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-result", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--collective-timeout", type=float, default=1200.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    distributed = args.nproc > 1 or args.ddp_worker
    if distributed and args.device not in (None, "cpu"):
        parser.error("--nproc times DDP over gloo on CPU: leave out --device or pass --device cpu")
    if args.threads is None:
        args.threads = 1 if distributed else 2
    if args.steps is None:
        args.steps = 90 if distributed else 100
    if distributed:
        os.environ.setdefault("WANDB_SILENT", "true")
        warnings.filterwarnings("ignore")
        torch.set_num_threads(args.threads)
        (ddp_worker if args.ddp_worker else main_ddp)(args)
        return
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_SILENT", "true")
    warnings.filterwarnings("ignore")
    workloads = CUDA_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
    if args.compile:
        import compiled_overhead

        compiled_overhead.main(args, device, workloads)
        return
    if args.memory_child:
        import json

        with tempfile.TemporaryDirectory() as tmp:
            rows = [(r[0], r[1], r[4] * 2**20) for name, spec in selected(workloads, args.only).items()
                    for r in bench_workload(name, spec, device, args.steps, Path(tmp), args.variants)]
        print(json.dumps(rows))
        return
    peaks = (cpu_peaks_in_child(args) if device.type == "cpu" and PeakMemory(device).available
             and not args.skip_memory else None)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {device} ({where}); {versions()}")
    print(f"timed steps per variant {args.steps}, interleaved in blocks of {BLOCK}")
    print(f"{'workload':24} {'variant':48} {'step ms':>9} {'x time':>7} {'peak MiB':>9} {'x mem':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, spec in selected(workloads, args.only).items():
            rows = bench_workload(name, spec, device, args.steps, Path(tmp), args.variants)
            if peaks is not None:  # CPU: memory from the child, ratios to its "none"
                base = peaks[name, "none"]
                rows = [(*r[:4], peaks[name, r[1]] / 2**20, peaks[name, r[1]] / base if base > 0 else float("nan"),
                         r[6]) for r in rows]
            for row in rows:
                print(f"{row[0]:24} {row[1] + row[6]:48} {row[2]:9.2f} {row[3]:7.3f} {row[4]:9.1f} {row[5]:7.3f}",
                      flush=True)
            gap = above_floor(rows)
            if gap is not None:
                print(f"{name:24} gradscope every=1 above the empty-hooks floor: {gap:+.3f}", flush=True)
        if not args.skip_fixed:
            costs = fixed_cost_per_layer(device, Path(tmp), args.variants)
            print("fixed cost per watched layer, 100 x Linear(8, 8) batch 4 (tiny tensors: hooks, dispatch, "
                  "launches): " + ", ".join(f"{name} {us:.0f} us" for name, us in costs))
        if not args.skip_load:
            seconds, rows = time_load_run(Path(tmp))
            print(f"load_run, resnet110, 10,000 recorded steps ({rows:,} layer rows): {seconds:.2f} s (target 3 s)")
        print(f"first-non-finite check, host, per flush of 50 recorded steps x 200 layers: "
              f"{time_nonfinite_check():.2f} ms (no device work)")


if __name__ == "__main__":
    main()
