"""ResNet-50 as torchvision builds it (He et al. 2015, table 1), for the compute-bound GPU workload.

The reference zoo has the CIFAR family only, and torchvision cannot be installed beside the CPU
torch here (it pulls a CUDA build), so the benchmark carries its own: bottleneck blocks
(1x1, 3x3, 1x1 convs, 4x expansion, stride on the 3x3 as in torchvision's "v1.5"), projection
shortcuts where the shape changes, ``layer1..layer4`` as ``nn.Sequential``s. Nothing tells
gradscope where its blocks are: it finds them the way it finds a user's (siblings of one class in
a Sequential), compares those that keep their input's shape with the identity and records why
not for the first of each stage, which is what a user of a torchvision model gets.
"""

from __future__ import annotations

from torch import Tensor, nn

LAYERS = (3, 4, 6, 3)  # bottleneck blocks per stage: ResNet-50
WIDTHS = (64, 128, 256, 512)
EXPANSION = 4


class Bottleneck(nn.Module):
    """y = ReLU(F(x) + shortcut(x)), F = 1x1 conv-BN-ReLU, 3x3 conv (stride)-BN-ReLU, 1x1 conv-BN."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * EXPANSION
        self.conv1, self.bn1 = nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:  # [batch, c_in, H, W] -> [batch, 4 width, H/stride, W/stride]
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """Stem (7x7 conv, stride 2, max pool), four bottleneck stages, average pool, linear head."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)
        c_in, stages = 64, []
        for i, (blocks, width) in enumerate(zip(LAYERS, WIDTHS)):
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(c_in, width, 2 if b == 0 and i > 0 else 1))
                c_in = width * EXPANSION
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:  # [batch, 3, H, W] -> [batch, num_classes]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))
