"""The engine (impl="kernel") against the reference oracles (SPEC §7) on realistic models.

float64: every quantity ("taylor", "oba", "exact") at every key ("out", "in", "weight",
"bias") of every target layer within ``FLOAT64_RTOL`` (relative Frobenius) of
``oba_ext.reference.ReferenceScorer``. Models are randomly initialised torchvision networks
on tiny inputs (batch 2, 16×16 or 32×32) so the float64 oracles stay cheap.

The reference is run on a copy with in-place activations switched off: it records the
outputs of bilinear nodes and differentiates the loss with respect to them, and an in-place
ReLU right after a Linear/Conv overwrites that output (its ``oba`` then differs by ~30%; the
engine matches the reference run on the mathematically identical out-of-place model).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from oba_ext.engine import build_scorer
from oba_ext.reference import ReferenceScorer
from oba_ext.scoring import checked_loss, default_loss
from oba_ext.targets import find_layers
from tolerances import BN_TRAIN_OUT_MAX, assert_f64, assert_matches, assert_matches_pooled, train_bn_fed_layers

QUANTITIES = ("taylor", "oba", "exact")
KEYS = ("out", "in", "weight", "bias")


def compare(model, x, y, loss_fn=None, quantities=QUANTITIES, keys=KEYS, dtype=torch.float64,
            ref_model=None):
    """Engine on ``model`` vs the reference on ``ref_model`` (default: ``model`` itself,
    in-place activations included)."""
    loss = checked_loss(loss_fn or default_loss)
    layers = find_layers(model)
    eng = build_scorer(model, layers, loss, (x, y))(x, y, quantities, keys)
    ref_model = model if ref_model is None else ref_model
    ref = ReferenceScorer(ref_model, find_layers(ref_model), loss)(x, y, quantities, keys)
    bn_fed = train_bn_fed_layers(model) if dtype == torch.float64 else set()
    n = 0
    for name in layers:
        for q in quantities:
            scale = torch.cat([t.reshape(-1) for t in ref[name][q].values()]).norm().item()
            for k, r in ref[name][q].items():
                e = eng[name][q][k]
                if dtype != torch.float64:
                    assert_matches(e, r, dtype=dtype, what=f"{name} {q} {k}")
                elif name in bn_fed and k in ("out", "bias"):
                    assert_f64(e, r, f"{name} {q} {k}", "bn_train", scale)
                else:
                    assert_f64(e, r, f"{name} {q} {k}")
                n += 1
    assert n >= len(layers) * len(quantities) * 3
    return eng, ref


def assert_float32_rule(m64, x64, y, what=""):
    """SPEC §7 float32 rule (tests/tolerances.py): the engine on a float32 copy of ``m64`` vs
    the float64 oracle, against the float32 reference path's own error — per tensor and, for
    the many small tensors a single sample cannot judge, pooled over the whole model."""
    loss = checked_loss(default_loss)
    ref64 = ReferenceScorer(m64, find_layers(m64), loss)(x64, y, QUANTITIES, KEYS)
    m32, x32 = copy.deepcopy(m64).float(), x64.float()
    layers32 = find_layers(m32)
    eng32 = build_scorer(m32, layers32, loss, (x32, y))(x32, y, QUANTITIES, KEYS)
    ref32 = ReferenceScorer(m32, layers32, loss)(x32, y, QUANTITIES, KEYS)
    items = [(f"{name} {q} {k}", eng32[name][q][k], r, ref32[name][q][k])
             for name in layers32 for q in QUANTITIES for k, r in ref64[name][q].items()]
    assert len(items) >= 3 * len(QUANTITIES) * len(layers32)
    assert_matches_pooled(items, torch.float32, what=what)


def _batch(size=32, n=2, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def test_resnet18_eval():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10).double().eval()
    compare(m, *_batch(32))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_vgg11_bn(train):
    torch.manual_seed(1)
    m = torchvision.models.vgg11_bn(num_classes=10).double()
    m.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 32), nn.ReLU(inplace=True),
                                 nn.Dropout(), nn.Linear(32, 10)).double()
    m.train(train)
    for mod in m.modules():  # BN in train mode, dropout off (the engine refuses random masks)
        if isinstance(mod, nn.Dropout):
            mod.eval()
    eng, _ = compare(m, *_batch(32))
    if train:
        # SPEC §7.3: a conv followed by train-mode BN has ≈ zero out-channel oba (exactly zero
        # but for BN's ε, which breaks scale invariance by ~ε/var: observed ~1e-7 of the terms)
        out = eng["features.4"]["oba"]["out"]
        assert out.abs().max() <= BN_TRAIN_OUT_MAX * eng["features.4"]["oba"]["weight"].abs().sum()


def test_mobilenet_v2_depthwise():
    torch.manual_seed(2)
    m = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25).double().eval()
    for mod in m.modules():  # random BN statistics so eval BN is not the identity
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    compare(m, *_batch(16))


class TokenMLP(nn.Module):
    """[B, T, C] Linear + LayerNorm + GELU (+ tanh GELU, SiLU), mean over tokens, head."""

    def __init__(self, c=8, hidden=12, classes=5):
        super().__init__()
        self.embed = nn.Linear(6, c)
        self.norm1 = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, c)
        self.norm2 = nn.LayerNorm(c)
        self.fc3 = nn.Linear(c, hidden, bias=False)
        self.fc4 = nn.Linear(hidden, c)
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(self.act(self.fc1(self.norm1(h))))
        h = h + self.fc4(nn.functional.silu(self.fc3(nn.functional.gelu(self.norm2(h),
                                                                        approximate="tanh"))))
        return self.head(h.mean(1))


def test_token_mlp():
    torch.manual_seed(3)
    m = TokenMLP().double()
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    y = torch.tensor([0, 4, 2])
    compare(m, x, y)


def test_token_mlp_mse_loss():
    torch.manual_seed(4)
    m = TokenMLP(classes=3).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    y = torch.randn(2, 3, dtype=torch.float64)
    compare(m, x, y, loss_fn=nn.MSELoss())


def test_float32_parity():
    """SPEC §7 float32 rule (tests/tolerances.py) on a small eval-mode ResNet."""
    torch.manual_seed(5)
    m64 = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                           num_classes=10).double().eval()
    for mod in m64.modules():  # random BN statistics so eval BN is not the identity
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
    x64, y = _batch(16, seed=7)
    assert_float32_rule(m64, x64, y)


@pytest.mark.cuda
def test_cuda_resnet18_float64_and_float32():
    """On a GPU the engine (CUDA kernels when built) matches the float64 oracle, and float32
    obeys the SPEC §7 rule against the float32 reference."""
    torch.manual_seed(9)
    m = torchvision.models.resnet18(num_classes=10).double().eval().cuda()
    x, y = (v.cuda() for v in _batch(32, n=4))
    compare(m, x, y)
    assert_float32_rule(m, x, y, what="cuda ")
