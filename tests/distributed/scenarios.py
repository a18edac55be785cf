"""Models, data and the training loop shared by the multi-process workers and the one-process
references they are compared with (the same seed, the global batch split over the ranks)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gradscope.testing import Residual

STEPS = 6
GLOBAL_BATCH = 8


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


def noise_problem(n: int = 256, dim: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed least-squares dataset for the gradient noise scale (single- and multi-process tests)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, dim, generator=g)
    y = x @ torch.randn(dim, 1, generator=g) + 0.5 * torch.randn(n, 1, generator=g)
    return x, y


def noise_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(6, 1)


def per_example_truth(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """|G|^2 and tr(Sigma) of the dataset, directly from every example's own gradient (float64)."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        F.mse_loss(model(x[i:i + 1]), y[i:i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double())
    model.zero_grad()
    per = torch.stack(rows)
    mean = per.mean(0)
    return float(mean.square().sum()), float((per - mean).square().sum(1).mean())


def noise_steps(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int,
                micro: int, size: int, seed: int) -> None:
    """Steps of ``micro`` micro-batches of ``size`` examples drawn with replacement (so the small
    batches are independent, as the estimators assume), each loss divided by ``micro``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(micro):
            idx = torch.randint(0, len(x), (size,), generator=g)
            (F.mse_loss(model(x[idx]), y[idx]) / micro).backward()
        opt.step()
