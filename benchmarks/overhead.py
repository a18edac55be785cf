"""Training-step overhead of gradscope, as ratios to the uninstrumented step.

Variants run interleaved in rounds in one process, so drift in machine speed hits them alike.
Prints a table: median step time per variant and its ratio to no instrumentation.

    python benchmarks/overhead.py [--device cpu|cuda] [--steps 30] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import gradscope


def cnn(width: int = 32, blocks: int = 9) -> nn.Module:
    """A plain 3x3-conv stack with BatchNorm and in-place ReLU, resnet20-sized."""
    layers: list[nn.Module] = []
    for i in range(2 * blocks + 1):
        layers += [nn.Conv2d(3 if i == 0 else width, width, 3, padding=1, bias=False),
                   nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def mlp(width: int = 512, depth: int = 12) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


WORKLOADS = {
    "cnn": (cnn, lambda b, d: torch.randn(b, 3, 32, 32, device=d), 64),
    "mlp": (mlp, lambda b, d: torch.randn(b, 512, device=d), 256),
}


def time_steps(model, opt, x, y, steps, device, rec=None) -> list[float]:
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if rec is not None:
            rec.step(loss=loss)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, gradscope {gradscope.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {args.threads} threads"))
    print(f"{'workload':10} {'variant':12} {'median ms':>10} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, make_x, batch) in WORKLOADS.items():
            torch.manual_seed(0)
            model = make().to(device)
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            x, y = make_x(batch, device), torch.randint(0, 10, (batch,), device=device)
            time_steps(model, opt, x, y, 5, device)  # warm-up
            samples: dict[str, list[float]] = {"none": [], "every=1": [], "every=10": []}
            for r in range(args.rounds):
                for variant in samples:
                    if variant == "none":
                        samples[variant] += time_steps(model, opt, x, y, args.steps, device)
                        continue
                    every = int(variant.split("=")[1])
                    path = Path(tmp) / f"{name}-{variant}-{r}"
                    with gradscope.watch(model, path, optimizer=opt, every=every) as rec:
                        ts = time_steps(model, opt, x, y, args.steps, device, rec)
                    # sampled schedules: the mean counts the recorded steps fairly
                    samples[variant] += ts
            base = statistics.median(samples["none"])
            for variant, ts in samples.items():
                t = statistics.median(ts) if variant != "every=10" else statistics.fmean(ts)
                print(f"{name:10} {variant:12} {t * 1e3:10.2f} {t / base:7.3f}")


if __name__ == "__main__":
    main()
