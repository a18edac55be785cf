"""Models, data and the training loop shared by the multi-process workers and the one-process
references they are compared with (the same seed, the global batch split over the ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STEPS = 6
GLOBAL_BATCH = 8


class Residual(nn.Module):
    """x + tanh(Wx): a block with a Tanh (saturation) inside."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.lin(x))


def make_model(kind: str = "mlp") -> nn.Module:
    """The same weights in every process (seeded). ``bn`` has BatchNorm (whose statistics are
    per rank under DDP, so it is only checked to run and record)."""
    torch.manual_seed(0)
    if kind == "bn":
        return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(Residual(16), Residual(16), Residual(16)),
                         nn.Linear(16, 4))


def batches(steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(GLOBAL_BATCH, 8, generator=g) * 3 + 1, torch.randn(GLOBAL_BATCH, 4, generator=g))
            for _ in range(steps)]


def shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1)


def train(model: nn.Module, opt: torch.optim.Optimizer, rec, data, rank: int = 0, world: int = 1,
          fail_at: int | None = None, eval_at: int | None = None, after_step=None) -> list[float]:
    """SGD on this rank's share of each global batch; returns the local losses. ``fail_at``
    raises at that step (before backward); ``eval_at`` logs an evaluation after that step, on
    rank 0 only (an evaluation off the schedule that the other ranks never see)."""
    losses = []
    for step, (x, y) in enumerate(data):
        out = model(shard(x, rank, world))
        loss = F.mse_loss(out, shard(y, rank, world))
        if fail_at is not None and step == fail_at:
            raise ValueError(f"boom at step {step} on rank {rank}")
        opt.zero_grad()
        loss.backward()
        rec.step(loss=loss)
        opt.step()
        losses.append(float(loss.detach()))
        if eval_at is not None and step == eval_at and rank == 0:
            rec.log_eval(loss=0.5)
        if after_step is not None:
            after_step(step)
    return losses
