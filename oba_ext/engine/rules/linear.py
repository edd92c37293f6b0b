"""nn.Linear (target or not), for inputs (..., C_in) — 2-D (B, C) or token-shaped (B, T, C).

Stacking along the flattened leading dims: ``[X; T]`` is ``(2·N, C_in)`` with ``N = Π lead``.
Channels: out = last dim of Y, in = last dim of X.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .. import kernels
from . import register_module
from .target import TwoStreamLayerRule


class LinearRule(TwoStreamLayerRule):
    def apply(self, module, x, w):
        return F.linear(x, w)

    def input_grad(self, module, g, w, x_shape):
        return (g.reshape(-1, g.shape[-1]) @ w).reshape(x_shape)

    def weight_score(self, module, w, grads, inputs):
        return kernels.linear_weight_score(w, grads, inputs)

    def weight_product(self, module, w, grads, inputs):
        # Σ_k G_kᵀ X_k as accumulating GEMMs over the flattened leading dims (no stacking copy)
        out = None
        for g, x in zip(grads, inputs):
            g2, x2 = g.reshape(-1, w.shape[0]), x.reshape(-1, w.shape[1])
            out = g2.t() @ x2 if out is None else out.addmm_(g2.t(), x2)
        return out

    def channel_dims(self, y):
        return y.dim() - 1, y.dim() - 1

    def bias_view(self, b, y):
        return b

    def forward(self, call, ctx):
        if call.inputs[0].dim() < 2:
            raise ValueError(f"{ctx.name}: the engine needs a batched input (N, ..., C_in) for "
                             f"nn.Linear, got shape {tuple(call.inputs[0].shape)}")
        return super().forward(call, ctx)


register_module(nn.Linear)(LinearRule())
