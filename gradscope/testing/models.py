"""Tiny deterministic models that exercise what real ones do to a recorder."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TinyMLP(nn.Sequential):
    """Linear/ReLU stack: the plainest case."""

    def __init__(self, d_in: int = 8, width: int = 16, depth: int = 3, classes: int = 4) -> None:
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.ReLU()]
        layers.append(nn.Linear(width, classes))
        super().__init__(*layers)


class TinyCNN(nn.Module):
    """Conv/BatchNorm with ``ReLU(inplace=True)``: in-place ops after a watched layer."""

    def __init__(self, channels: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, stride=2, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:  # x: [batch, 3, H, W]
        return self.head(self.features(x).mean(dim=(2, 3)))


class TwiceCalled(nn.Module):
    """Calls one submodule twice per forward, so its calls must merge."""

    def __init__(self, d: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.shared = nn.Linear(d, d)
        self.out = nn.Linear(d, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class Residual(nn.Module):
    """x + tanh(Wx): a residual block with a Tanh (saturation) inside; siblings of it in an
    ``nn.Sequential`` or ``nn.ModuleList`` are found as blocks."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.act = nn.Tanh()

    def forward(self, x: Tensor) -> Tensor:
        return x + self.act(self.lin(x))
