"""A small CNN for 8×8 (or larger) single-channel images, used by ``oba-ext demo`` on
scikit-learn's digits. Input (N, C, H, W); conv-BN-ReLU ×3 (widths w, 2w, 4w, one 2×2 pool),
global average pooling, Linear(4w, num_classes).
"""
from __future__ import annotations

from torch import nn


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: int = 16):
        super().__init__()

        def block(ci, co):
            return [nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(in_channels, width), *block(width, 2 * width),
                                      nn.MaxPool2d(2), *block(2 * width, 4 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def small_cnn(num_classes: int = 10, **kw):
    return SmallCNN(num_classes, **kw)
