"""What each analysis of ``gradscope.analyses`` costs, in seconds and as a multiple of a training step.

- noise scale: the recorded training step with ``watch(noise_scale=True)`` against the same step
  recorded without it (gradient accumulation over 4 micro-batches, every step recorded), and
  against no recorder; the analysis itself (``analyses.noise_scale`` on the run) once;
- shattering: one checkpoint (a line of 256 inputs, one forward and one backward);
- lesion: one run (a forward per block on 256 held-out samples).

Not asking for an analysis costs nothing: no hook is attached (tests/test_analyses.py checks it).
Medians of ``--repeats`` (steps: of ``--steps`` after a warm-up).

    python benchmarks/analyses_cost.py [--device cpu|cuda] [--steps 30] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from attribution_cost import _median_seconds  # a sibling script (benchmarks/ is on sys.path when run)

import gradscope
from gradscope import analyses
from gradscope.lab.train import _backward, build, make_optimizer, recipe_for, resolve_device

WORKLOADS = {"resnet20": ("images", 64, {}), "mlp_residual": ("images", 128, {"depth": 20, "width": 256})}
MICRO = 4  # micro-batches per step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(name: str, variant: str, steps: int, device: torch.device, out: Path) -> float:
    """Median seconds of one training step (MICRO micro-batches) under ``variant``: none, watch, noise."""
    task_name, batch, overrides = WORKLOADS[name]
    model, task = build(name, task_name, overrides=overrides)
    model.to(device)
    opt = make_optimizer(model, recipe_for(name, steps))
    x, y = next(task.batches(batch, seed=0))
    x, y = x.to(device), y.to(device)
    rec = None if variant == "none" else gradscope.watch(model, out / f"{name}-{variant}", optimizer=opt,
                                                          noise_scale=variant == "noise", overwrite=True)
    times = []
    for i in range(steps + 5):
        _sync(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, acc = _backward(model, x, y, MICRO, None, False, torch.float16)
        if rec is not None:
            rec.step(loss=loss, accuracy=acc)
        opt.step()
        _sync(device)
        if i >= 5:
            times.append(time.perf_counter() - start)
    if rec is not None:
        rec.close()
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"torch {torch.__version__}, device {device}, {MICRO} micro-batches per step")
    print(f"{'model':14} {'what':34} {'seconds':>10} {'x step':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for name, (task_name, _batch, overrides) in WORKLOADS.items():
            none, watched, noise = (step_seconds(name, v, args.steps, device, out) for v in ("none", "watch", "noise"))
            print(f"{name:14} {'step, no recorder':34} {none:10.4f} {1.0:8.2f}")
            print(f"{name:14} {'step, watch(every=1)':34} {watched:10.4f} {watched / none:8.2f}")
            print(f"{name:14} {'step, watch(every=1, noise_scale)':34} {noise:10.4f} {noise / none:8.2f}"
                  f"   ({noise / watched:.3f}x the recorded step without it)")
            run = out / f"{name}-noise"
            seconds = _median_seconds(lambda: analyses.noise_scale(run), args.repeats, device)
            print(f"{name:14} {f'noise_scale analysis, {args.steps + 5} steps':34} {seconds:10.4f} "
                  f"{seconds / none:8.2f}")
            model, task = build(name, task_name, overrides=overrides)
            model.to(device)
            start, end = task.test_inputs[0], task.test_inputs[1]
            seconds = _median_seconds(lambda: analyses.shattering(model, start, end), args.repeats, device)
            print(f"{name:14} {'shattering checkpoint, 256 points':34} {seconds:10.4f} {seconds / none:8.2f}")
            x, y = task.test_inputs[:256].to(device), task.test_targets[:256].to(device)
            seconds = _median_seconds(lambda: analyses.lesion(model, x, y), args.repeats, device)
            print(f"{name:14} {'lesion, 256 samples, every block':34} {seconds:10.4f} {seconds / none:8.2f}")


if __name__ == "__main__":
    main()
