"""Kernel launches gradscope adds to a recorded step on a GPU, counted on any machine.

A GPU step of the sizes in benchmarks/overhead.py is bound by the host launching kernels (about
15 us each on an H200's host), so the number of launches gradscope adds is its cost there. This
script counts them without a GPU: it runs a workload on the CPU with the GPU's batched path
forced on (``kernels.MODE = "torch"``), stands in for the Triton kernels with counters (one
launch per group of up to eight tensors, as ``gradscope.recording.kernels`` launches them), and counts
every other non-view op that gradscope's own code issues, by source line, under a
``TorchDispatchMode``. The model's own ops are not counted. Autocast runs on the CPU where the
workload asks for it, so dtype conversions show up as they would on the GPU.

    python benchmarks/launches.py [--workload pre-LN] [--gpu-sizes] [--steps 2] [--rows 20]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import CPU_WORKLOADS, CUDA_WORKLOADS, time_steps  # noqa: E402

import gradscope  # noqa: E402
from gradscope.recording import kernels  # noqa: E402

# Ops that make views or aliases: no kernel on a GPU.
_VIEWS = {"aten.view.default", "aten.select.int", "aten.slice.Tensor", "aten.detach.default",
          "aten.unsqueeze.default", "aten.transpose.int", "aten.t.default", "aten.as_strided.default",
          "aten.expand.default", "aten._unsafe_view.default", "aten.alias.default", "aten.reshape.default",
          "aten.split.Tensor", "aten.permute.default", "aten.squeeze.dim", "aten.unbind.int"}
_PACKAGE = str(Path(gradscope.__file__).resolve().parent)
_MODELS = str(Path(_PACKAGE) / "lab")  # reference models and the trainer


def _origin() -> str | None:
    """file:line of the innermost gradscope frame (not the lab's: reference models) that issued the op."""
    for frame in reversed(traceback.extract_stack(limit=16)):
        if frame.filename.startswith(_PACKAGE) and not frame.filename.startswith(_MODELS):
            return f"{Path(frame.filename).name}:{frame.lineno} {frame.name}"
    return None


class CountOps(TorchDispatchMode):
    def __init__(self, counts: collections.Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) not in _VIEWS:
            where = _origin()
            if where is not None:
                self.counts[f"{func}  ({where})"] += 1
        return func(*args, **(kwargs or {}))


def count_kernels(counts: collections.Counter) -> None:
    """Replace the Triton kernels by counters of the launches they would make."""
    groups = kernels._groups
    kernels.uses_triton = lambda device: True
    for name in ("reduce_moments", "reduce_squares", "reduce_moment", "sample_squares", "block_sums"):
        def stand_in(*args, _name=name, **kwargs):
            launches = len(groups(args[0], 8)) if _name in ("reduce_moments", "reduce_squares") else 1
            counts[f"Triton kernel {_name}"] += launches
        setattr(kernels, name, stand_in)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default=None, help="a fragment of the workloads' names (default: all)")
    parser.add_argument("--gpu-sizes", action="store_true", help="the CUDA workloads (slow on a CPU)")
    parser.add_argument("--steps", type=int, default=2, help="recorded steps counted (after 3 warm-up steps)")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(2)
    kernels.MODE = "torch"  # the batched path on a CPU
    counts: collections.Counter = collections.Counter()
    count_kernels(counts)
    device = torch.device("cpu")
    workloads = CUDA_WORKLOADS if args.gpu_sizes else CPU_WORKLOADS
    for name, (make, make_batch, autocast) in workloads.items():
        if args.workload and args.workload not in name:
            continue
        torch.manual_seed(0)
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        batch = make_batch(device)
        with tempfile.TemporaryDirectory() as tmp:
            rec = gradscope.watch(model, Path(tmp) / "run", optimizer=opt)
            after = lambda loss: rec.step(loss=loss)  # noqa: E731
            time_steps(model, opt, batch, 3, device, autocast, after)  # layers learned, caches built
            counts.clear()
            with CountOps(counts):
                time_steps(model, opt, batch, args.steps, device, autocast, after)
            rec.close()
        total = sum(counts.values()) / args.steps
        print(f"\n== {name}: {total:.0f} launches per recorded step from gradscope "
              f"({len(rec.layers)} layers, {len(rec.blocks)} blocks watched)")
        for key, n in counts.most_common(args.rows):
            print(f"{n / args.steps:7.1f}  {key}")


if __name__ == "__main__":
    main()
