"""Small networks trained on real data for the fidelity study (``benchmarks/fidelity.py``).

Data: scikit-learn's bundled 8×8 handwritten digits (1797 images, no download), split with a
fixed seed into a training set and a held-out set. Two networks:

- ``digits_cnn``: conv(1→16) → ReLU → conv(16→32) → ReLU → maxpool → fc(512→64) → ReLU →
  fc(64→10) on the 8×8 images;
- ``resnet``: a CIFAR-style ResNet (He et al. 2016, §4.2: a 3×3 stem, three stages of basic
  blocks with widths w, 2w, 4w, 1×1-conv + BN projection shortcuts when the shape changes,
  global average pooling, fc) on the digits resized (bilinear) to 32×32. ``depth = 6n + 2``:
  n = 1 gives resnet-8, n = 3 resnet-20. Default here: resnet-8 with w = 8 (178 channels),
  because the ΔL oracle runs one held-out evaluation per channel and a width-16 resnet-8 took
  2.9 s per float32 evaluation of 600 images on this shared 2-core machine (10 s in float64).

Training is plain Adam with fixed seeds; both train in a few seconds to a few tens of seconds
on two CPU cores. Models are returned in eval mode (BN uses running statistics, so scores and
the ΔL oracle see the same deterministic function).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from oba_ext.models.cifar_resnet import CifarResNet as _CifarResNet


@dataclass
class Split:
    """Images ``x`` (N, 1, H, W), labels ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def batches(self, batch_size: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Equal-size batches (the remainder is dropped, so the mean of the batch losses is the
        loss of the whole split — the quantity the ΔL oracle measures)."""
        n = (len(self.y) // batch_size) * batch_size
        return [(self.x[i:i + batch_size], self.y[i:i + batch_size]) for i in range(0, n, batch_size)]


def load_digits(size: int = 8, heldout: int = 600, seed: int = 0) -> Tuple[Split, Split]:
    """(train, held-out) splits of scikit-learn's digits, standardised, resized to ``size``²."""
    from sklearn.datasets import load_digits as _load
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = x[heldout:].mean(), x[heldout:].std()
    x = (x - mean) / std
    return Split(x[heldout:], y[heldout:]), Split(x[:heldout], y[:heldout])


class DigitsCNN(nn.Module):
    """(N, 1, 8, 8) -> (N, 10) logits."""

    def __init__(self, c1: int = 16, c2: int = 32, hidden: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc1 = nn.Linear(c2 * 16, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def CifarResNet(n: int = 1, width: int = 16, in_ch: int = 1, classes: int = 10) -> nn.Module:
    """CIFAR-style ResNet-(6n+2): (N, C_in, 32, 32) -> (N, classes); the package's
    :class:`oba_ext.models.CifarResNet` with PyTorch's default initialization."""
    return _CifarResNet(6 * n + 2, classes, in_ch, width=width, kaiming_init=False)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 600) -> Tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) of ``model`` on ``split``, in the model's dtype."""
    dtype = next(model.parameters()).dtype
    loss, correct = 0.0, 0
    for i in range(0, len(split.y), batch_size):
        x, y = split.x[i:i + batch_size].to(dtype), split.y[i:i + batch_size]
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
    return loss / len(split.y), correct / len(split.y)


def train(model: nn.Module, data: Split, epochs: int, lr: float = 2e-3, batch_size: int = 64,
          seed: int = 0) -> Dict[str, float]:
    """Adam + cosine schedule, fixed seed; returns {"seconds", "train_loss"}; leaves eval mode."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * (len(data.y) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    t0, last = time.perf_counter(), float("nan")
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data.y), generator=g)
        for i in range(0, len(perm) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(data.x[idx]), data.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            last = loss.item()
    model.eval()
    return {"seconds": time.perf_counter() - t0, "train_loss": last}


#: name -> (input size, constructor(depth, width), default epochs)
MODELS = {
    "digits_cnn": (8, lambda depth, width: DigitsCNN(), 30),
    "resnet": (32, lambda depth, width: CifarResNet(n=(depth - 2) // 6, width=width), 8),
}


def build_trained(name: str, depth: int = 8, width: int = 8, epochs: int = None, seed: int = 0,
                  heldout: int = 600):
    """(model in eval mode, train split, held-out split, training facts) for ``name`` in MODELS."""
    if name not in MODELS:
        raise ValueError(f"model: unknown fidelity model {name!r}; expected one of {sorted(MODELS)}")
    if name == "resnet" and ((depth - 2) % 6 != 0 or depth < 8):
        raise ValueError(f"depth: a CIFAR ResNet has depth 6n+2 (8, 14, 20, ...), got {depth}")
    size, ctor, default_epochs = MODELS[name]
    train_split, held = load_digits(size=size, heldout=heldout, seed=seed)
    torch.manual_seed(seed)
    model = ctor(depth, width)
    facts = train(model, train_split, epochs if epochs is not None else default_epochs, seed=seed)
    return model, train_split, held, facts
