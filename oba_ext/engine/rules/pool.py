"""Pooling. Max pooling is piecewise linear: the tangent and both cotangents follow the
argmax of the real activation X (``T_y = T[argmax]``, ``G_x = scatter_add(argmax, G)``); no
curvature. Average pooling (plain and adaptive) is linear in X.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_function, register_module
from .shape import LinearOpRule

_MAXPOOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
                 "return_indices")


class MaxPoolRule:
    def __init__(self, fn):
        self.fn = fn  # F.max_pool1d / F.max_pool2d

    def forward(self, call, ctx):
        m = call.module
        if m is not None:
            kw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                      dilation=m.dilation, ceil_mode=m.ceil_mode)
            ret = m.return_indices
        else:
            a = dict(zip(_MAXPOOL_ARGS, call.args))
            a.update(call.kwargs)
            ret = a.pop("return_indices", False)
            a.pop("input", None)
            kw = a
        if ret:
            raise ValueError(f"{ctx.name}: max pooling with return_indices=True is not "
                             f"supported by the engine")
        x, t = call.inputs[0], call.tangents[0]
        y, idx = self.fn(x, return_indices=True, **kw)
        flat = idx.flatten(2)
        t_y = t.flatten(2).gather(2, flat).view_as(y) if t is not None else None
        ctx.idx, ctx.x_shape = flat, x.shape
        return y, t_y

    def _scatter(self, ctx, v):
        n, ch = ctx.x_shape[0], ctx.x_shape[1]
        out = v.new_zeros((n, ch, int(torch.Size(ctx.x_shape[2:]).numel())))
        out.scatter_add_(2, ctx.idx, v.flatten(2))
        return out.view(ctx.x_shape)

    def backward(self, ctx, g, c):
        return [(self._scatter(ctx, g), self._scatter(ctx, c) if c is not None else None)]


def _global_avg_back(ctx, v):
    hw = 1
    for s in ctx.x_shape[2:]:
        hw *= s
    return (v / hw).expand(ctx.x_shape)


def _is_global(call):
    out = call.module.output_size if call.module is not None else (
        call.args[1] if len(call.args) > 1 else call.kwargs["output_size"])
    out = (out,) if isinstance(out, int) else tuple(out)
    return all(o == 1 for o in out)


class AdaptiveAvgPoolRule(LinearOpRule):
    """Global pooling (output 1×…×1) has the hand transpose ``G/HW`` broadcast; other output
    sizes use ``torch.func.vjp`` of the op."""

    def __init__(self):
        super().__init__(vjp=None)

    def forward(self, call, ctx):
        ctx.global_pool = _is_global(call)
        return super().forward(call, ctx)

    def _transpose(self, ctx, v):
        if ctx.global_pool:
            return _global_avg_back(ctx, v)
        return super()._transpose(ctx, v)


register_module(nn.MaxPool1d)(MaxPoolRule(F.max_pool1d))
register_module(nn.MaxPool2d)(MaxPoolRule(F.max_pool2d))
register_function(F.max_pool1d)(MaxPoolRule(F.max_pool1d))
register_function(F.max_pool2d)(MaxPoolRule(F.max_pool2d))
_AVG = LinearOpRule()
register_module(nn.AvgPool1d, nn.AvgPool2d)(_AVG)
register_function(F.avg_pool1d, F.avg_pool2d)(_AVG)
_ADAPTIVE = AdaptiveAvgPoolRule()
register_module(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)(_ADAPTIVE)
register_function(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d)(_ADAPTIVE)
