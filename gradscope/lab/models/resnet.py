"""CIFAR ResNets of He et al. 2015 (section 4.2), their plain twins, and pre-activation ResNets.

6n+2 weighted layers: a 3x3 stem conv with 16 filters, three stages of n blocks with 16/32/64
filters (two 3x3 convs per block, stride 2 at the first block of stages 2 and 3), global
average pooling and a linear head. BatchNorm follows every conv, before the ReLU; in the residual
net the ReLU comes after the addition. Option A shortcuts (identity, zero-padded channels where
the width grows) add no parameters, so ``plainN`` and ``resnetN`` have identical parameters and
the same block names: only the skip differs.

Pre-activation units (He et al. 2016, "Identity Mappings in Deep Residual Networks"):
BN, ReLU, conv, BN, ReLU, conv, then the addition with nothing after it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.lab.models.registry import register_model
from gradscope.recording.blocks import BlockSpec

STAGE_WIDTHS = (16, 32, 64)
DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}  # 6n + 2 -> n


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class PadShortcut(nn.Module):
    """Option A: subsample by the stride and zero-pad the new channels (no parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: Tensor) -> Tensor:  # [batch, c_in, H, W] -> [batch, c_out, H/s, W/s]
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


def make_shortcut(c_in: int, c_out: int, stride: int, option: str, preact: bool = False) -> nn.Module:
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    if option == "A":
        return PadShortcut(c_in, c_out, stride)
    if option == "B":  # 1x1 projection; BN after it in the post-activation design only
        proj = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        return proj if preact else nn.Sequential(proj, nn.BatchNorm2d(c_out))
    raise ValueError(f"shortcut must be 'A' (zero-padding identity) or 'B' (projection), got {option!r}")


class BasicBlock(nn.Module):
    """y = ReLU(F(x) + shortcut(x)), F = conv-BN-ReLU-conv-BN; without the shortcut when plain."""

    def __init__(self, c_in: int, c_out: int, stride: int, residual: bool, shortcut: str) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            conv3x3(c_in, c_out, stride), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
            conv3x3(c_out, c_out), nn.BatchNorm2d(c_out),
        )
        self.shortcut = make_shortcut(c_in, c_out, stride, shortcut) if residual else None
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        if self.shortcut is not None:
            out = out + self.shortcut(x)
        return self.relu(out)


class PreActBlock(nn.Module):
    """y = F(x) + shortcut(x), F = BN-ReLU-conv-BN-ReLU-conv, nothing after the addition."""

    def __init__(self, c_in: int, c_out: int, stride: int, residual: bool, shortcut: str) -> None:
        super().__init__()
        self.branch = nn.Sequential(
            nn.BatchNorm2d(c_in), nn.ReLU(), conv3x3(c_in, c_out, stride),
            nn.BatchNorm2d(c_out), nn.ReLU(), conv3x3(c_out, c_out),
        )
        self.shortcut = make_shortcut(c_in, c_out, stride, shortcut, preact=True) if residual else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.branch(x)
        return out + self.shortcut(x) if self.shortcut is not None else out


class CifarResNet(nn.Module):
    """The CIFAR family of He et al.: residual, plain, or pre-activation, any n."""

    def __init__(self, n: int, *, residual: bool = True, preact: bool = False, shortcut: str = "A",
                 num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if n < 1:
            raise ValueError(f"blocks per stage must be at least 1, got {n}")
        self.depth = 6 * n + 2
        self.residual, self.preact = residual, preact
        block = PreActBlock if preact else BasicBlock
        stem: list[nn.Module] = [conv3x3(in_channels, STAGE_WIDTHS[0])]
        if not preact:
            stem += [nn.BatchNorm2d(STAGE_WIDTHS[0]), nn.ReLU(inplace=True)]
        self.stem = nn.Sequential(*stem)
        c_in = STAGE_WIDTHS[0]
        for i, width in enumerate(STAGE_WIDTHS, start=1):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 1 and j == 0) else 1
                blocks.append(block(c_in, width, stride, residual, shortcut))
                c_in = width
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        # pre-activation nets end with the BN-ReLU their last unit leaves out
        self.final = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU()) if preact else nn.Identity()
        self.fc = nn.Linear(c_in, num_classes)
        _kaiming_init(self)

    def forward(self, x: Tensor) -> Tensor:  # [batch, C, H, W] -> [batch, classes]
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.final(x)
        return self.fc(x.mean(dim=(2, 3)))

    def gradscope_blocks(self) -> list[BlockSpec]:
        return [
            BlockSpec(f"layer{i}.{j}", branch=f"layer{i}.{j}.branch", residual=self.residual,
                      shortcut=f"layer{i}.{j}.shortcut" if self.residual else None)
            for i in (1, 2, 3) for j in range(len(getattr(self, f"layer{i}")))
        ]


def _kaiming_init(model: nn.Module) -> None:
    """He et al.'s initialisation for ReLU nets; BN starts as the identity."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _register(prefix: str, family: str, depth: int, residual: bool, preact: bool, what: str) -> None:
    n = DEPTHS[depth]

    def factory(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
                shortcut: str = "A") -> nn.Module:
        # input_size only shapes example inputs: the network pools globally, any size works
        return CifarResNet(n, residual=residual, preact=preact, shortcut=shortcut,
                           num_classes=num_classes, in_channels=in_channels)

    register_model(f"{prefix}{depth}", family=family, input_kind="image",
                   description=f"{what}, {depth} layers (n={n})")(factory)


for _depth in DEPTHS:
    _register("resnet", "resnet", _depth, residual=True, preact=False,
              what="CIFAR ResNet of He et al. 2015")
    _register("plain", "plain", _depth, residual=False, preact=False,
              what="plain twin of the CIFAR ResNet (no shortcuts)")
    _register("preresnet", "preresnet", _depth, residual=True, preact=True,
              what="pre-activation CIFAR ResNet of He et al. 2016")
