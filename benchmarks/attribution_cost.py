"""Cost of one attribution checkpoint, as a multiple of one training step of the same model.

A checkpoint runs Captum on a 64-sample held-out probe batch (the CLI's default); a training
step is forward, backward and SGD update on a batch of the recipe's size. Medians of ``--repeats``.

    python benchmarks/attribution_cost.py [--device cpu|cuda] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradscope import Attribution
from gradscope.lab.train import PROBE_SIZE, _forward, build, loss_and_accuracy, resolve_device
from gradscope.recording.attribution import AttributionProbe
from gradscope.recording.blocks import select_blocks

WORKLOADS = {"resnet20": ("images", 128, {}), "transformer_lm_pre": ("dyck", 64, {"depth": 6})}
METHODS = ("grad_x_act", "integrated_gradients", "conductance")


def _median_seconds(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])  # the first call warms up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}, probe {PROBE_SIZE} samples, path methods 20 steps")
    print(f"{'model':20} {'method':22} {'blocks':>6} {'checkpoint s':>12} {'x step':>8}")
    for name, (task_name, batch, overrides) in WORKLOADS.items():
        model, task = build(name, task_name, overrides=overrides)
        model.to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        batches = task.batches(batch)

        def step() -> None:
            x, y = next(batches)
            x = tuple(t.to(device) for t in x) if isinstance(x, tuple) else x.to(device)
            loss, _ = loss_and_accuracy(_forward(model, x), y.to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()

        step_s = _median_seconds(step, args.repeats, device)
        probe = (task.test_inputs[:PROBE_SIZE], task.test_targets[:PROBE_SIZE])
        blocks = select_blocks(model, None)
        for method in METHODS:
            try:
                run = AttributionProbe(Attribution(probe, method=method), model, blocks, device)
            except ValueError as exc:
                print(f"{name:20} {method:22} {'-':>6} {'n/a':>12} {'':>8}  ({str(exc).split(';')[0]})")
                continue
            s = _median_seconds(run, args.repeats, device)
            print(f"{name:20} {method:22} {len(run.units):6d} {s:12.3f} {s / step_s:8.1f}")


if __name__ == "__main__":
    main()
