"""Where a recorded step's time goes: torch.profiler over a few steps with and without gradscope.

Prints, per variant, the ops with the most self CPU time (and CUDA time on a GPU) and the number
of kernel launches per step, for one of benchmarks/overhead.py's workloads.

    python benchmarks/profile_step.py [--device cpu|cuda] [--workload resnet] [--steps 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from overhead import CPU_WORKLOADS, CUDA_WORKLOADS, time_steps  # noqa: E402

import gradscope  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workload", default="resnet", help="a fragment of the workload's name")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--python", action="store_true",
                        help="also cProfile gradscope's steps: the Python side of the host's time")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(2) if device.type == "cpu" else None
    workloads = CUDA_WORKLOADS if device.type == "cuda" else CPU_WORKLOADS
    name = next(n for n in workloads if args.workload in n)
    make, make_batch, autocast = workloads[name]
    torch.manual_seed(0)
    model = make().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    batch = make_batch(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sorts = ["self_cpu_time_total"] + (["self_cuda_time_total"] if device.type == "cuda" else [])
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("none", "gradscope every=1"):
            rec = gradscope.watch(model, Path(tmp) / "r", optimizer=opt) if variant != "none" else None
            after = (lambda loss: rec.step(loss=loss)) if rec else (lambda loss: None)
            time_steps(model, opt, batch, 3, device, autocast, after)
            with profile(activities=activities) as prof:
                time_steps(model, opt, batch, args.steps, device, autocast, after)
            if rec and args.python:
                import cProfile
                import pstats

                prof_py = cProfile.Profile()
                prof_py.runcall(time_steps, model, opt, batch, args.steps, device, autocast, after)
                print(f"\n== {name}, {variant}: Python, {args.steps} steps, by own time")
                pstats.Stats(prof_py).sort_stats("tottime").print_stats(args.rows)
            if rec:
                rec.close()
            events = prof.key_averages()
            launches = sum(e.count for e in events
                           if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
            cpu_total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
            print(f"\n== {name}, {variant}: {launches / args.steps:.0f} kernel launches per step, "
                  f"{cpu_total:.1f} ms self CPU per step")
            for sort in sorts:  # on a GPU the host (launches) and the device each get a table
                print(events.table(sort_by=sort, row_limit=args.rows))


if __name__ == "__main__":
    main()
