"""Deep MLPs, plain and residual: the simplest place to watch gradients vanish.

Images are flattened, a stem ``Linear`` maps them to ``width``, then ``depth - 2`` blocks of
activation + ``Linear``, then activation + linear head: ``depth`` weighted layers in all. A
residual block adds its input back, y = x + W act(x) + b (activation first, as in He et al.
2016's pre-activation units, so the stream gains no drifting mean); the plain twin has the same
blocks without the skip, i.e. the classic Linear-activation stack; ``norm="batch"`` puts
BatchNorm before each activation. With sigmoid the plain net's gradient shrinks toward the input
(the derivative is at most 1/4, Glorot and Bengio 2010); the skip gives it a path that does not
shrink.
"""

from __future__ import annotations

from torch import Tensor, nn

from gradscope.lab.models.registry import register_model
from gradscope.recording.blocks import BlockSpec

ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU}


NORMS = ("none", "batch")


class MLPBlock(nn.Module):
    def __init__(self, width: int, activation: str, residual: bool, norm: str = "none") -> None:
        super().__init__()
        self.branch = nn.Sequential(*_norm(norm, width), ACTIVATIONS[activation](), nn.Linear(width, width))
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:  # [batch, width]
        out = self.branch(x)
        return x + out if self.residual else out


class DeepMLP(nn.Module):
    def __init__(self, depth: int, width: int, activation: str, residual: bool, in_features: int,
                 num_classes: int, norm: str = "none") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if depth < 3:
            raise ValueError(f"depth counts weighted layers (stem, blocks, head) and must be >= 3, got {depth}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {norm!r}")
        self.depth, self.residual = depth, residual
        self.stem = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width))
        self.blocks = nn.Sequential(*(MLPBlock(width, activation, residual, norm) for _ in range(depth - 2)))
        self.head = nn.Sequential(*_norm(norm, width), ACTIVATIONS[activation](), nn.Linear(width, num_classes))
        gain = "relu" if activation in ("relu", "gelu") else None
        for m in self.modules():
            if isinstance(m, nn.Linear):  # Glorot for saturating units, He for rectifiers
                if gain:
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                else:
                    nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if residual and gain:
            # x + W relu(x) with He init doubles the stream's variance per block (2^18 at depth 20);
            # scaling each branch by 1/sqrt(blocks), as Fixup does, keeps it bounded (about e).
            for block in self.blocks:
                block.branch[-1].weight.data.mul_(len(self.blocks) ** -0.5)

    def forward(self, x: Tensor) -> Tensor:  # [batch, ...] -> [batch, classes]
        return self.head(self.blocks(self.stem(x)))

    def gradscope_blocks(self) -> list[BlockSpec]:
        return [BlockSpec(f"blocks.{i}", branch=f"blocks.{i}.branch", residual=self.residual)
                for i in range(len(self.blocks))]


def _norm(norm: str, width: int) -> list[nn.Module]:
    """BatchNorm before the activation (Balduzzi et al. 2017's shattering setting), or nothing."""
    return [nn.BatchNorm1d(width)] if norm == "batch" else []


def _factory(residual: bool):
    def factory(depth: int = 20, width: int = 128, activation: str = "relu", num_classes: int = 10,
                in_channels: int = 3, input_size: int = 32, norm: str = "none") -> nn.Module:
        return DeepMLP(depth, width, activation, residual, in_channels * input_size**2, num_classes, norm)

    return factory


register_model("mlp_plain", family="mlp", input_kind="image",
               description="plain deep MLP on flattened images (depth, width, activation overridable)")(_factory(False))
register_model("mlp_residual", family="mlp", input_kind="image",
               description="residual deep MLP, y = x + W act(x) + b per block")(_factory(True))
