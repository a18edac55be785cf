"""Record a small deep network while it trains, then read the run back and summarise it.

A 10-layer sigmoid MLP on a synthetic classification task: the sigmoid's derivative is at most
1/4, so the gradient flowing back shrinks layer by layer (Glorot and Bengio 2010). Run:

    python examples/quickstart.py [--run runs/quickstart] [--steps 200]
"""

from __future__ import annotations

import argparse

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import gradscope


def sigmoid_mlp(depth: int = 10, width: int = 64, d_in: int = 32, classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def synthetic_task(n: int, d_in: int = 32, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels from a fixed random linear teacher: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    teacher = torch.randn(d_in, classes, generator=g)
    return x, (x @ teacher).argmax(dim=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quickstart", help="run directory to write (replaced)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    model = sigmoid_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    x, y = synthetic_task(4096)

    with gradscope.watch(model, args.run, every=args.every, optimizer=opt, overwrite=True) as rec:
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (128,))
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            rec.step(loss=loss, accuracy=(logits.argmax(1) == y[idx]).float().mean())
            opt.step()

    run = gradscope.load_run(args.run)
    print(f"run {run.path}: {run.status}, {run.scalars.step.nunique()} recorded steps, "
          f"{len(run.layer_table)} layers\n")
    print(run.scalars.iloc[[0, -1]].to_string(index=False, float_format="%.4g"), "\n")

    first, last = run.layers.step.min(), run.layers.step.max()
    train = run.layers[run.layers.phase == "train"]
    cols = ["depth", "layer", "act_std", "grad_out_rms", "grad_norm", "update_ratio"]
    for step in (first, last):
        table = train[train.step == step][cols]
        print(f"step {step}:")
        print(table.to_string(index=False, float_format="%.3g"), "\n")
        g = table.set_index("depth").grad_out_rms
        print(f"  dL/dy RMS at the first layer is {g.iloc[0] / g.iloc[-1]:.2g} x the last layer's\n")


if __name__ == "__main__":
    pd.set_option("display.width", 120)
    main()
