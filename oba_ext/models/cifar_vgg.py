"""CIFAR VGG with BatchNorm (the "vgg19" of the network-slimming / DepGraph CIFAR benchmarks).

Input (N, 3, 32, 32). ``features``: 3×3 conv → BN → ReLU blocks with 2×2 max-pools from
``CFGS``; then global average pooling and ``classifier``: Linear(512, 512) → ReLU →
Linear(512, num_classes).
"""
from __future__ import annotations

from torch import nn

CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512],
}


class CifarVGG(nn.Module):
    def __init__(self, cfg: str = "vgg19", num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if cfg not in CFGS:
            raise ValueError(f"cfg: expected one of {sorted(CFGS)}, got {cfg!r}")
        layers, c = [], in_channels
        for v in CFGS[cfg]:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(c, 512), nn.ReLU(inplace=True),
                                        nn.Linear(512, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


def vgg19(num_classes: int = 10, **kw):
    return CifarVGG("vgg19", num_classes, **kw)


def vgg16_cifar(num_classes: int = 10, **kw):
    return CifarVGG("vgg16", num_classes, **kw)
