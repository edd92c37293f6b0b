"""Shared two-stream logic of Linear/Conv layers (SPEC §3, §5).

Forward, one GEMM/conv on the batch-stacked streams ``[X; T]``:
    ``Y = W⊛X + b``; target: ``T_Y = W⊛T_X + Y`` (``δW⊛X + δb = Y`` since ``δθ = θ``);
    non-target: ``T_Y = W⊛T_X``.
Backward, one input-gradient GEMM/conv on ``[G; C+G]`` (target) or ``[G; C]`` (non-target):
    ``G_X = Wᵀ⊛G``, ``C_X = Wᵀ⊛(C+G)`` (target) / ``Wᵀ⊛C``.
Scores (SPEC §5), recorded during backward from what the sweeps hold:
    out_o  = Σ [G⊙(T_Y−Y) + C⊙Y]_o        first: Σ [G⊙Y]_o
    in_j   = Σ [T⊙G_X + X⊙(C_X−G_X)]_j    first: Σ [X⊙G_X]_j
    weight = W ⊙ (Gᵀ T + Cᵀ X)              first: W ⊙ GᵀX
    bias   = b ⊙ Σ C                        first: b ⊙ Σ G
``None`` streams are zeros: with ``T_X = 0`` the forward is one ordinary GEMM and
``T_Y = Y`` (no copy); with ``C = 0`` (``oba`` right after the loss) ``C_X = G_X``.
Subclasses provide the op: :meth:`apply` (no bias), :meth:`input_grad`, :meth:`weight_score`,
:meth:`channel_dims`, :meth:`bias_view`.
"""
from __future__ import annotations

import torch

from .. import kernels
from .pairs import stack_pair


class TwoStreamLayerRule:
    """Linear/Conv rule; ``ctx.layer`` is the scored name (``None`` for a non-target layer)."""

    def apply(self, module, x, w):  # pragma: no cover - abstract
        raise NotImplementedError

    def input_grad(self, module, g, w, x_shape):  # pragma: no cover - abstract
        raise NotImplementedError

    def weight_score(self, module, w, grads, inputs):  # pragma: no cover - abstract
        raise NotImplementedError

    def channel_dims(self, y):  # (out channel dim of Y, in channel dim of X)
        raise NotImplementedError  # pragma: no cover - abstract

    def bias_view(self, b, y):
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, call, ctx):
        m = call.module
        x, t = call.inputs[0], call.tangents[0]
        w, b = m.weight, m.bias
        target = ctx.layer is not None
        if t is None:
            y = self.apply(m, x, w)
            if b is not None:
                y = y + self.bias_view(b, y)
            t_y = y if (target and ctx.tangents) else None
        else:
            # one GEMM/conv on [X; T]; the fresh output buffer [WX; WT] becomes [Y; T_Y] in
            # place, so Y and T_Y stay paired for the next layer (rules/pairs.py)
            n = x.shape[0]
            s = self.apply(m, stack_pair(x, t), w)
            y, t_y = s[:n], s[n:]
            if b is not None:
                y.add_(self.bias_view(b, y))
            if target:
                t_y.add_(y)
        ctx.module, ctx.w, ctx.x_shape = m, w, x.shape
        if target:
            keys = ctx.keys
            if "out" in keys:
                ctx.y, ctx.t_y = y, t_y
            if "in" in keys or "weight" in keys:
                ctx.x, ctx.t = x, t
        return y, t_y

    def backward(self, ctx, g, c):
        m, w = ctx.module, ctx.w
        target = ctx.layer is not None
        keys = ctx.keys if target else ()
        gx = cx = None
        if (target and ctx.mode is not None and c is not None and not ctx.needs[0]
                and not ctx.first and "in" in keys and ctx.t is None):
            # data input (T_X = 0, no cotangent wanted): in_j = Σ X⊙(C_X − G_X) = Σ X⊙WᵀC,
            # one single-stream input gradient instead of a stacked one
            u = self.input_grad(m, c, w, ctx.x_shape)
            _, idim = self.channel_dims(ctx.x)
            _, sec = kernels.channel_score_reduce(u, None, None, ctx.x, idim)
            ctx.record(ctx.mode, "in", sec)
            self._scores(ctx, m, w, g, c, None, None, skip_in=True)
            return [None]
        need_x = ctx.needs[0] or "in" in keys
        if need_x:
            if ctx.mode is None or c is None:
                gx = self.input_grad(m, g, w, ctx.x_shape)
                cx = gx if (target and ctx.mode is not None) else None
            else:
                # one input-gradient GEMM/conv on [G; C] (paired when possible):
                # [WᵀG; WᵀC], then C_X = WᵀC + G_X in place for a target layer
                n = ctx.x_shape[0]
                s = self.input_grad(m, stack_pair(g, c), w, (2 * n,) + tuple(ctx.x_shape[1:]))
                gx, cx = s[:n], s[n:]
                if target:
                    cx.add_(gx)
        if target:
            self._scores(ctx, m, w, g, c, gx, cx)
        if not ctx.needs[0]:
            return [None]
        return [(gx, cx)]

    def _scores(self, ctx, m, w, g, c, gx, cx, skip_in=False):
        keys, mode, first = ctx.keys, ctx.mode, ctx.first
        if "out" in keys:
            od, _ = self.channel_dims(ctx.y)
            if mode is None:
                ctx.record("taylor", "out", _first_only(g, ctx.y, od))
            else:
                second, fst = kernels.channel_score_reduce(g, ctx.t_y, c, ctx.y, od)
                ctx.record(mode, "out", second)
                if first:
                    ctx.record("taylor", "out", fst)
        if "in" in keys and not skip_in:
            _, idim = self.channel_dims(ctx.x)
            if mode is None:
                ctx.record("taylor", "in", _first_only(gx, ctx.x, idim))
            else:
                second, fst = kernels.channel_score_reduce(gx, ctx.t, cx, ctx.x, idim)
                ctx.record(mode, "in", second)
                if first:
                    ctx.record("taylor", "in", fst)
        if "weight" in keys:
            if mode is not None:
                grads, inputs = [], []
                if ctx.t is not None:
                    grads.append(g)
                    inputs.append(ctx.t)
                if c is not None:
                    grads.append(c)
                    inputs.append(ctx.x)
                ctx.record(mode, "weight", self.weight_score(m, w, grads, inputs)
                           if grads else torch.zeros_like(w))
            if mode is None or first:
                ctx.record("taylor", "weight", self.weight_score(m, w, [g], [ctx.x]))
        b = m.bias
        if "bias" in keys and b is not None:
            od, _ = self.channel_dims(g)
            dims = [i for i in range(g.dim()) if i != od]
            acc = _acc_dtype(g)
            if mode is not None:
                ctx.record(mode, "bias", b.to(acc) * c.sum(dims, dtype=acc) if c is not None
                           else torch.zeros_like(b, dtype=acc))
            if mode is None or first:
                ctx.record("taylor", "bias", b.to(acc) * g.sum(dims, dtype=acc))


def _acc_dtype(x):
    """Channel sums accumulate in float64 for float64 streams, else float32 (like the ops)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _first_only(a, d, channel_dim):
    dims = [i for i in range(a.dim()) if i != channel_dim]
    return (a * d).sum(dims, dtype=_acc_dtype(a))
