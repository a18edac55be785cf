"""Record a Lightning run with gradscope: one callback, no change to the LightningModule.

A 6-layer tanh MLP on a synthetic regression task, on the CPU. Run (``pip install gradscope[lightning]``):

    python examples/lightning_gradscope.py [--run runs/lightning] [--steps 20] [--devices 2]

``--devices 2`` trains under Lightning's DDP strategy (gloo): every rank records, rank 0 writes
the merged run.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gradscope
from gradscope.integrations.lightning import GradScope, pl


class Regressor(pl.LightningModule):
    def __init__(self, depth: int = 6, width: int = 32) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(8 if i == 0 else width, width), nn.Tanh()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(n: int = 512, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/lightning")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--clip", type=float, default=1.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", devices=args.devices,
                         strategy="ddp" if args.devices > 1 else "auto", accumulate_grad_batches=args.accumulate,
                         gradient_clip_val=args.clip, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[GradScope(args.run, overwrite=True)])  # the one line gradscope adds
    trainer.fit(Regressor(), DataLoader(data(), batch_size=32, shuffle=True))

    if trainer.global_rank == 0:
        run = gradscope.load_run(args.run)
        print(run.scalars[["step", "loss", "grad_norm_pre_clip", "grad_norm_post_clip"]].tail().to_string(index=False))
        for finding in gradscope.diagnose([run]):
            print("-", finding)


if __name__ == "__main__":
    main()
