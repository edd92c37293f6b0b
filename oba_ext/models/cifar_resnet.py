"""CIFAR-style ResNets (He et al. 2016, §4.2): 3 stages of 6n+2 layers, widths w/2w/4w (w = 16).

``resnet20/32/56/110``: input (N, 3, 32, 32) (any H, W ≥ 8 works: global average pooling).
Shortcuts that change shape use a 1×1 conv + BN projection ("option B") rather than zero
padding ("option A"), so Torch-Pruning can prune every residual group consistently.
"""
from __future__ import annotations

from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: conv3×3(w) → 3 stages × n BasicBlocks (widths w, 2w,
    4w) → GAP → fc. ``kaiming_init=False`` keeps PyTorch's default initialization (the fidelity
    benchmark's trained models)."""

    def __init__(self, depth: int = 56, num_classes: int = 10, in_channels: int = 3,
                 width: int = 16, kaiming_init: bool = True):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"depth: expected 6n+2 (8, 20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        layers, c = [], width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(c, w, 2 if (j == 0 and i > 0) else 1))
                c = w
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)
        for m in self.modules():
            if kaiming_init and isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet20(num_classes: int = 10, **kw):
    return CifarResNet(20, num_classes, **kw)


def resnet32(num_classes: int = 10, **kw):
    return CifarResNet(32, num_classes, **kw)


def resnet56(num_classes: int = 10, **kw):
    return CifarResNet(56, num_classes, **kw)


def resnet110(num_classes: int = 10, **kw):
    return CifarResNet(110, num_classes, **kw)
