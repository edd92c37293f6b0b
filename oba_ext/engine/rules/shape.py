"""Ops linear in their first tensor input (shape ops, slicing, pooling-free reductions, casts,
identity; dropout is in :mod:`.random`): ``T_y = f(T)``, ``G_x = fᵀ(G)``, ``C_x = fᵀ(C)``, no curvature.

:class:`LinearOpRule` takes an optional hand-written transpose ``vjp(ctx, v) -> v_x``; without
one it uses ``torch.func.vjp`` at the saved input. If another tensor input is θ-dependent the
op is not linear in the streams, and the rule hands over to the generic rule.
"""
from __future__ import annotations

import operator

import torch
from torch import nn

from . import register_function, register_method, register_module
from .generic import GENERIC


class LinearOpRule:
    def __init__(self, vjp=None, save_input: bool = False, check=None):
        self.vjp, self.save_input, self.check = vjp, save_input, check

    def forward(self, call, ctx):
        # another floating input with a stream makes the op non-linear in the streams (a bool
        # mask or an integer index carries none: ``x[idx]`` stays linear in x)
        if any((t is not None or n) and x.is_floating_point() for x, t, n in
               zip(call.inputs[1:], call.tangents[1:], call.needs[1:])):
            ctx.delegate = GENERIC
            return GENERIC.forward(call, ctx)
        ctx.delegate = None
        if self.check is not None:
            self.check(call, ctx)
        x, t = call.inputs[0], call.tangents[0]
        rest = call.inputs[1:]
        y = call.invoke([x] + rest)
        t_y = call.invoke([t] + rest) if t is not None else None
        ctx.x_shape, ctx.n_inputs, ctx.call = x.shape, len(call.inputs), call
        if self.vjp is None or self.save_input:
            ctx.x = x
        return y, t_y

    def _transpose(self, ctx, v):
        if self.vjp is not None:
            return self.vjp(ctx, v)
        call = ctx.call
        rest = call.inputs[1:]
        _, fn = torch.func.vjp(lambda u: call.invoke([u] + rest), ctx.x)
        return fn(v)[0]

    def backward(self, ctx, g, c):
        if ctx.delegate is not None:
            return ctx.delegate.backward(ctx, g, c)
        gx = self._transpose(ctx, g)
        cx = self._transpose(ctx, c) if c is not None else None
        return [(gx, cx)] + [None] * (ctx.n_inputs - 1)


def _reshape_back(ctx, v):
    return v.reshape(ctx.x_shape)


def _permute_back(ctx, v):
    args = ctx.call.args
    dims = args[1:] if len(args) > 2 or not isinstance(args[1], (tuple, list)) else args[1]
    if "dims" in ctx.call.kwargs:
        dims = ctx.call.kwargs["dims"]
    dims = [d % v.dim() for d in dims]
    inv = [0] * len(dims)
    for i, d in enumerate(dims):
        inv[d] = i
    return v.permute(inv)


def _transpose_back(ctx, v):
    a = list(ctx.call.args[1:]) + [ctx.call.kwargs.get(k) for k in ("dim0", "dim1")
                                   if k in ctx.call.kwargs]
    return v.transpose(a[0], a[1])


def _t_back(ctx, v):
    return v.t()


def _expand_back(ctx, v):
    return v.sum_to_size(ctx.x_shape)


def _is_basic_index(idx):
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


def _getitem_back(ctx, v):
    idx = ctx.call.args[1]
    if _is_basic_index(idx):
        out = v.new_zeros(ctx.x_shape)
        out[idx] = v
        return out
    _, fn = torch.func.vjp(lambda u: u[idx], ctx.x)
    return fn(v)[0]


class CastRule(LinearOpRule):
    """``x.float()``, ``x.to(dtype)``, ``x.type_as(y)``: T and the cotangents are cast the same
    way (back to the input dtype in backward). Device moves are cast back likewise."""

    def __init__(self):
        super().__init__(vjp=None)

    def forward(self, call, ctx):
        ctx.x_dtype = call.inputs[0].dtype
        ctx.x_device = call.inputs[0].device
        y, t_y = super().forward(call, ctx)
        # a bool/integer value on either side (``mask.float()``, ``x.long()``) carries no stream
        ctx.no_stream = not (call.inputs[0].is_floating_point()
                             and isinstance(y, torch.Tensor) and y.is_floating_point())
        return y, (None if ctx.no_stream else t_y)

    def backward(self, ctx, g, c):
        if ctx.delegate is None and ctx.no_stream:
            return [None] * ctx.n_inputs
        return super().backward(ctx, g, c)

    def _transpose(self, ctx, v):
        return v.to(device=ctx.x_device, dtype=ctx.x_dtype)


class SplitRule:
    """``chunk`` / ``split`` / ``unbind`` (tuple outputs): streams split the same way; the
    cotangents of the pieces (``None`` = zero, pieces nobody read) are concatenated back."""

    def __init__(self, dim_pos: int, stack: bool = False):
        self.dim_pos, self.stack = dim_pos, stack

    def forward(self, call, ctx):
        if len(call.inputs) != 1:
            ctx.delegate = GENERIC
            return GENERIC.forward(call, ctx)
        ctx.delegate = None
        x, t = call.inputs[0], call.tangents[0]
        dim = call.args[self.dim_pos] if len(call.args) > self.dim_pos else call.kwargs.get("dim", 0)
        ys = call.invoke([x])
        ts = call.invoke([t]) if t is not None else None
        ctx.dim = dim % x.dim()
        ctx.shapes = [y.shape for y in ys]
        ctx.like = x
        return ys, ts

    def _join(self, ctx, parts):
        parts = [p if p is not None else ctx.like.new_zeros(shape)
                 for p, shape in zip(parts, ctx.shapes)]
        return torch.stack(parts, ctx.dim) if self.stack else torch.cat(parts, ctx.dim)

    def backward(self, ctx, g, c):
        if ctx.delegate is not None:
            return ctx.delegate.backward(ctx, g, c)
        gx = self._join(ctx, g)
        cx = self._join(ctx, c) if c is not None else None
        return [(gx, cx)]


def _sum_back(ctx, v):
    call = ctx.call
    names = ("input", "dim", "keepdim")
    a = dict(zip(names, call.args))
    a.update(call.kwargs)
    dim = a.get("dim")
    if dim is None:
        return v.expand(ctx.x_shape)
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not a.get("keepdim", False):
        for d in sorted(x % len(ctx.x_shape) for x in dims):
            v = v.unsqueeze(d)
    return v.expand(ctx.x_shape)


def _mean_back(ctx, v):
    out = _sum_back(ctx, v)
    n = 1
    call = ctx.call
    dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim")
    if dim is None:
        n = int(torch.Size(ctx.x_shape).numel())
    else:
        for d in ([dim] if isinstance(dim, int) else dim):
            n *= ctx.x_shape[d]
    return out / n


RESHAPE = LinearOpRule(_reshape_back)
register_function(torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze,
                  torch.clone)(RESHAPE)
register_method("view", "reshape", "flatten", "squeeze", "unsqueeze", "contiguous",
                "clone", "unflatten", "view_as", "reshape_as")(RESHAPE)
register_module(nn.Flatten, nn.Unflatten, nn.Identity)(RESHAPE)
register_function(torch.permute)(LinearOpRule(_permute_back))
register_method("permute")(LinearOpRule(_permute_back))
register_function(torch.transpose)(LinearOpRule(_transpose_back))
register_method("transpose")(LinearOpRule(_transpose_back))
register_method("t")(LinearOpRule(_t_back))
register_method("expand", "expand_as")(LinearOpRule(_expand_back))
register_function(operator.getitem)(LinearOpRule(_getitem_back, save_input=True))
register_method("to", "float", "double", "half", "bfloat16", "type_as")(CastRule())
register_function(torch.chunk, torch.split)(SplitRule(dim_pos=2))
register_method("chunk", "split")(SplitRule(dim_pos=2))
register_function(torch.unbind)(SplitRule(dim_pos=1, stack=True))
register_method("unbind")(SplitRule(dim_pos=1, stack=True))
register_function(torch.sum)(LinearOpRule(_sum_back))
register_method("sum")(LinearOpRule(_sum_back))
register_function(torch.mean)(LinearOpRule(_mean_back))
register_method("mean")(LinearOpRule(_mean_back))
