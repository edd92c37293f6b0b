"""Tensor metadata reads: ``x.shape``, ``x.dtype``, ``x.device`` (fx ``getattr``) and the
methods ``x.size()``, ``x.dim()``, ``x.numel()``. Their results are not tensors: no tangent,
no cotangent. (timm blocks and torchvision's ViT read ``x.shape`` in forward.)

A ``getattr`` that yields a tensor (``x.T``, ``x.mT``) is handed to the generic rule, which is
exact for these linear ops.
"""
from __future__ import annotations

import builtins

import torch

from . import register_function, register_method
from .generic import GENERIC_QUIET


class MetadataRule:
    def forward(self, call, ctx):
        y = call.invoke(call.inputs)
        if isinstance(y, torch.Tensor):
            ctx.delegate = GENERIC_QUIET
            return GENERIC_QUIET.forward(call, ctx)
        ctx.delegate = None
        ctx.n_inputs = len(call.inputs)
        return y, None

    def backward(self, ctx, g, c):
        if ctx.delegate is not None:
            return ctx.delegate.backward(ctx, g, c)
        return [None] * ctx.n_inputs


register_function(builtins.getattr)(MetadataRule())
register_method("size", "dim", "numel")(MetadataRule())
