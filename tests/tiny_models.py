"""Tiny float64 models with hand-written functional twins, for brute-force oracle checks.

Each case has an ``nn.Module`` and a functional twin ``fn(params, x, nl)`` that uses the same
parameter names and routes every *non-bilinear* op through ``nl(f, a)``. With ``nl`` the identity
application the twin is the model; with :class:`Linearizer` in "linearize" mode every non-bilinear
op is replaced by its linearization at the recorded forward value — the network whose Hessian
minus the GGN is OBA's Ĥ (SPEC §2). Written independently of ``oba_ext.reference``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linearizer:
    """``nl(f, a)``: in "record" mode returns f(a) and stores a; in "linearize" mode returns
    ``f(a0) + J_f(a0)(a − a0)`` for the stored a0 (by call order)."""

    def __init__(self):
        self.mode, self.saved, self.i = "record", [], 0

    def __call__(self, f, a):
        if self.mode == "record":
            self.saved.append(a.detach())
            return f(a)
        a0 = self.saved[self.i]
        self.i += 1
        y0, dy = torch.func.jvp(f, (a0,), (a - a0,))
        return y0 + dy

    def start_linearized(self):
        self.mode, self.i = "linearize", 0


def plain(f, a):
    return f(a)


# ---- a GELU MLP with biases -------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.tanh(self.fc1(x)))))


def mlp_fn(p, x, nl):
    h = nl(torch.tanh, F.linear(x, p["fc1.weight"], p["fc1.bias"]))
    h = nl(F.gelu, F.linear(h, p["fc2.weight"], p["fc2.bias"]))
    return F.linear(h, p["fc3.weight"], p["fc3.bias"])


# ---- a CNN with BatchNorm (eval or train mode) ---------------------------------------------
class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = F.silu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def _bn(p, bufs, name, training):
    def norm(a):
        return F.batch_norm(a, bufs[f"{name}.running_mean"].clone(), bufs[f"{name}.running_var"].clone(),
                            None, None, training, 0.1, 1e-5)
    return norm


def cnn_fn(p, x, nl, bufs, training):
    def affine(a, name):
        return a * p[f"{name}.weight"].view(1, -1, 1, 1) + p[f"{name}.bias"].view(1, -1, 1, 1)

    h = F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=1)
    h = nl(_bn(p, bufs, "bn1", training), h) if training else _bn(p, bufs, "bn1", False)(h)
    h = nl(F.relu, affine(h, "bn1"))
    h = nl(lambda a: F.max_pool2d(a, 2), h)
    h = F.conv2d(h, p["conv2.weight"], None, stride=2)
    h = nl(_bn(p, bufs, "bn2", training), h) if training else _bn(p, bufs, "bn2", False)(h)
    h = nl(F.silu, affine(h, "bn2"))
    return F.linear(h.mean(dim=(2, 3)), p["fc.weight"], p["fc.bias"])


# ---- a residual CNN (eval BN, grouped conv) --------------------------------------------------
class ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = self.c2(F.relu(self.bn(self.c1(x))))
        x = F.relu(x + y)
        x = F.gelu(self.dw(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def rescnn_fn(p, x, nl, bufs):
    x = nl(F.relu, F.conv2d(x, p["stem.weight"], p["stem.bias"], padding=1))
    y = F.conv2d(x, p["c1.weight"], p["c1.bias"], padding=1, groups=2)
    y = F.batch_norm(y, bufs["bn.running_mean"], bufs["bn.running_var"], p["bn.weight"], p["bn.bias"],
                     False, 0.1, 1e-5)
    y = F.conv2d(nl(F.relu, y), p["c2.weight"], p["c2.bias"])
    x = nl(F.relu, x + y)
    x = nl(F.gelu, F.conv2d(x, p["dw.weight"], None, padding=1, groups=4))
    return F.linear(x.mean(dim=(2, 3)), p["fc.weight"], p["fc.bias"])


# ---- an attention block with a packed qkv projection (timm-style) ----------------------------
class AttnBlock(nn.Module):
    def __init__(self, dim=8, heads=2, classes=3):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        o = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(o.transpose(1, 2).reshape(B, N, C))
        return self.head(x.mean(1))


def attn_fn(p, x, nl, heads=2):
    B, N, C = x.shape
    h = nl(lambda a: F.layer_norm(a, (C,)), x) * p["norm.weight"] + p["norm.bias"]
    qkv = F.linear(h, p["qkv.weight"], p["qkv.bias"]).reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    s = (q @ k.transpose(-2, -1)) / math.sqrt(C // heads)
    a = nl(lambda t: torch.softmax(t, dim=-1), s)
    o = (a @ v).transpose(1, 2).reshape(B, N, C)
    x = x + F.linear(o, p["proj.weight"], p["proj.bias"])
    return F.linear(x.mean(1), p["head.weight"], p["head.bias"])
