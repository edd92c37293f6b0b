"""Normalization layers: BatchNorm (eval and train), LayerNorm, GroupNorm (SPEC §3).

Eval-mode BatchNorm is a per-channel affine map ``y = s·x + h`` (``s = γ/√(var+ε)``):
``T_y = s·T``, ``G_x = s·G``, ``C_x = s·C``; no curvature.

Batch-statistics normalization (train-mode BN; LN; GN) normalizes over a set of dims R:
``x̂ = (x − μ_R)·r``, ``r = 1/√(var_R + ε)``, ``y = γ⊙x̂ + β``. Its Jacobian is the symmetric
projection ``P(v) = r·(v − mean_R v − x̂·mean_R(x̂⊙v))``, so
``T_y = γ⊙P(T)``, ``G_x = P(γ⊙G)``, ``C_x = P(γ⊙C)`` and, for ``exact``, the second-order term
``dP(w)[T] = −r·(ẋ·mean_R(x̂⊙w) + x̂·mean_R(ẋ⊙w)) − P(w)·mean_R(x̂⊙T)·r`` with ``ẋ = P(T)``,
``w = γ⊙G``. Train-mode BN depends on batch statistics, so it is applied per stream (never on
stacked streams) and never updates running statistics.

Norm layers in the scored set (``ctx.layer``) record the first-order channel score
``out_k = Σ [G⊙y]_k = γ_k ∂L/∂γ_k + β_k ∂L/∂β_k`` ("taylor", "out").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_function, register_module
from .pairs import as_pair, halves, new_pair


def _mean(v, dims):
    return v.mean(dims, keepdim=True)


class _Projection:
    """x̂, r over dims R and the projection P of the module docstring."""

    def __init__(self, x, dims, eps):
        var, mu = torch.var_mean(x, dim=dims, unbiased=False, keepdim=True)
        self.dims = dims
        self.r = torch.rsqrt(var + eps)
        self.xhat = (x - mu) * self.r

    def __call__(self, v):
        d = self.dims
        return (v - _mean(v, d) - self.xhat * _mean(self.xhat * v, d)) * self.r

    def scaled(self, v, gamma):
        """``P(γ⊙v)`` (``P(v)`` for ``gamma=None``); ``v`` and ``gamma`` in the normalized
        layout."""
        return self(v if gamma is None else v * gamma)

    def second(self, w, t, tdot):
        d = self.dims
        xh = self.xhat
        return (-(tdot * _mean(xh * w, d) + xh * _mean(tdot * w, d)) * self.r
                - self(w) * (_mean(xh * t, d) * self.r))


class _TrailingProjection(_Projection):
    """:class:`_Projection` over the trailing dims (LayerNorm) on ATen's fused kernels:
    μ, r and x̂ (or, with affine γ/β, y = γ⊙x̂ + β, x̂ then recomputed on demand) from
    ``native_layer_norm``; P(v) and P(γ⊙v) from ``native_layer_norm_backward`` (its input
    gradient without / with affine weight γ). One pass each instead of the ~7 of the generic
    formula (LayerNorm was ~10% of a ViT's oba sweep on the CPU)."""

    def __init__(self, x, dims, eps, weight=None, bias=None):
        """With ``weight``/``bias`` (γ, β of the normalized shape) :attr:`y` = γ⊙x̂ + β comes
        from the same fused pass and x̂ is not kept (recomputed on demand)."""
        self.dims = dims
        self.x, self.shape = x, list(x.shape[dims[0]:])
        out, self.mu, self.r = torch.native_layer_norm(x, self.shape, weight, bias, eps)
        self.affine = weight is not None or bias is not None
        self._xhat, self.y = (None, out) if self.affine else (out, None)

    @property
    def xhat(self):
        """x̂; recomputed from (x, μ, r) after :meth:`drop_xhat` (the backward keeps x)."""
        return self._xhat if self._xhat is not None else (self.x - self.mu) * self.r

    def drop_xhat(self):
        self._xhat = None

    def __call__(self, v):
        return self.scaled(v, None)

    def scaled(self, v, gamma):
        """``P(γ⊙v)`` in one pass: ATen's layer-norm input gradient with affine weight γ."""
        return torch.ops.aten.native_layer_norm_backward(
            v.contiguous(), self.x, self.shape, self.mu, self.r, gamma, None,
            [True, False, False])[0]


def _is_trailing(x, dims):
    return len(dims) > 0 and list(dims) == list(range(x.dim() - len(dims), x.dim()))


class _NormCore:
    """Shared forward/backward of batch-statistics normalization on a (possibly reshaped) x."""

    @staticmethod
    def forward(ctx, x, t, dims, eps, gamma, beta, to_view, from_view, layer_norm=False):
        """``to_view``/``from_view`` reshape between x's layout and the normalized layout
        (GroupNorm's (N, G, C/G, ...)); ``gamma``/``beta`` broadcast against x's layout.
        ``layer_norm``: dims are x's trailing dims, use ATen's fused layer-norm kernels."""
        xv = to_view(x)
        fused = layer_norm and _is_trailing(xv, dims)
        if fused:  # y = γ⊙x̂ + β from ATen's fused layer norm (γ, β: the normalized shape)
            P = _TrailingProjection(xv, dims, eps, gamma, beta)
            y0 = P.y if P.affine else P.xhat
        else:
            P = _Projection(xv, dims, eps)
            xhat = from_view(P.xhat)
            y0 = None
        t_y = None
        tdot = None
        if t is None:
            if y0 is not None:
                y = y0
            else:
                y = xhat if gamma is None else xhat * gamma
                if beta is not None:
                    y = y + beta
        else:
            # y and T_y = γ⊙P(T) in the halves of one buffer (paired for the next Linear)
            tdot = P(to_view(t))
            y, t_y = halves(new_pair(x))
            if y0 is not None:
                y.copy_(y0)
            elif gamma is None:
                y.copy_(xhat)
            else:
                torch.mul(xhat, gamma, out=y)
            if y0 is None and beta is not None:
                y.add_(beta)
            if gamma is None:
                t_y.copy_(from_view(tdot))
            else:
                torch.mul(from_view(tdot), gamma, out=t_y)
        if fused:
            P.drop_xhat()  # the backward needs x, μ, r only (x̂ again for exact: recomputed)
            P.y = None
        ctx.P, ctx.gamma, ctx.to_view, ctx.from_view = P, gamma, to_view, from_view
        if ctx.want_exact and t is not None:
            ctx.t_v, ctx.tdot = to_view(t), tdot
        else:
            ctx.t_v = ctx.tdot = None
        return y, t_y

    @staticmethod
    def backward(ctx, g, c):
        P, gamma, tv, fv = ctx.P, ctx.gamma, ctx.to_view, ctx.from_view
        if isinstance(P, _TrailingProjection):  # γ has the normalized shape: P(γ⊙·) fused
            gx = P.scaled(g, gamma)
            cx = P.scaled(c, gamma) if c is not None else None
        else:
            gx = fv(P(tv(g if gamma is None else g * gamma)))
            cx = fv(P(tv(c if gamma is None else c * gamma))) if c is not None else None
        if ctx.exact and ctx.tdot is not None:
            w = tv(g if gamma is None else g * gamma)
            extra = fv(P.second(w, ctx.t_v, ctx.tdot))
            cx = extra if cx is None else cx + extra
        return gx, cx


def _ident(v):
    return v


def _channel_view(p, x):
    return None if p is None else p.view((1, -1) + (1,) * (x.dim() - 2))


def _keep_for_score(ctx, y, channel_dims):
    """For a scored norm layer (``ctx.layer`` set), keep its output y and the dims of y that
    index its channels, for :func:`_record_norm_out` in the backward."""
    if ctx.layer is not None:
        ctx.y, ctx.norm_channel_dims = y, channel_dims


def _record_norm_out(ctx, g):
    """Record ``out_k = Σ [G⊙y]_k`` (module docstring; ``g`` the output gradient G, shaped as
    y) over the dims kept by :func:`_keep_for_score`, once per sweep; no-op for an unscored
    layer."""
    if ctx.layer is None or not (ctx.mode is None or ctx.first):
        return
    y = ctx.y
    keep = set(d % y.dim() for d in ctx.norm_channel_dims)
    dims = [i for i in range(y.dim()) if i not in keep]
    ctx.record("taylor", "out", (g * y).sum(dims).reshape(-1))


def _norm_backward(ctx, g, c):
    """:meth:`_NormCore.backward` (``G_x``, ``C_x``), then the channel score of a scored layer."""
    gx, cx = _NormCore.backward(ctx, g, c)
    _record_norm_out(ctx, g)
    return gx, cx


def _layer_norm_forward(ctx, x, t, k, eps, weight, bias):
    """LayerNorm (module or functional) over x's ``k`` trailing dims: ``(y, T_y)`` of
    :meth:`_NormCore.forward` on ATen's fused kernels; a scored layer's channels are those
    ``k`` dims (``weight``/``bias`` have their shape)."""
    dims = list(range(x.dim() - k, x.dim()))
    y, t_y = _NormCore.forward(ctx, x, t, dims, eps, weight, bias, _ident, _ident,
                               layer_norm=True)
    _keep_for_score(ctx, y, dims)
    return y, t_y


def _bn_forward(ctx, x, t, batch_stats, running_mean, running_var, weight, bias, eps):
    """BatchNorm on x's channel dim 1: batch statistics (train mode, or no running stats) per
    stream, else the per-channel affine map; running statistics are never updated."""
    ctx.batch_stats = batch_stats
    gamma, beta = _channel_view(weight, x), _channel_view(bias, x)
    if batch_stats:
        dims = [0] + list(range(2, x.dim()))
        y, t_y = _NormCore.forward(ctx, x, t, dims, eps, gamma, beta, _ident, _ident)
    else:
        s = torch.rsqrt(running_var + eps)
        if weight is not None:
            s = s * weight
        h = -running_mean * s
        if bias is not None:
            h = h + bias
        s, h = _channel_view(s, x), _channel_view(h, x)
        p = as_pair(x, t)
        if p is not None:  # paired streams stay paired: [x; t]·s, then + h on the x half
            y, t_y = halves(p * s)
            y.add_(h)
        else:
            y = x * s + h
            t_y = t * s if t is not None else None
        ctx.s = s
    _keep_for_score(ctx, y, (1,))
    return y, t_y


def _bn_backward(ctx, g, c):
    if ctx.batch_stats:
        gx, cx = _NormCore.backward(ctx, g, c)
    else:
        p = as_pair(g, c)
        if p is not None:
            gx, cx = halves(p * ctx.s)
        else:
            gx = g * ctx.s
            cx = c * ctx.s if c is not None else None
    _record_norm_out(ctx, g)
    return gx, cx


class BatchNormRule:
    def forward(self, call, ctx):
        m = call.module
        return _bn_forward(ctx, call.inputs[0], call.tangents[0],
                           m.training or m.running_mean is None, m.running_mean, m.running_var,
                           m.weight, m.bias, m.eps)

    def backward(self, ctx, g, c):
        return [_bn_backward(ctx, g, c)]


def _functional_args(call, ctx, names, fn_name):
    """Bind a functional norm call's arguments; its non-input tensors must not carry streams."""
    a = dict(zip(names, call.args))
    a.update(call.kwargs)
    if any(tt is not None for tt in call.tangents[1:]) or any(call.needs[1:]):
        raise ValueError(f"{ctx.name}: {fn_name} with θ-dependent statistics, weight or bias is "
                         f"not supported by the engine")
    ctx.n_inputs = len(call.inputs)
    return a


class FunctionalBatchNormRule:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)``
    (timm's BatchNormAct2d calls it); records the channel scores of the scored BN layer whose
    weight it uses (capture sets ``ctx.layer``)."""

    records_norm = True

    def forward(self, call, ctx):
        a = _functional_args(call, ctx, ("input", "running_mean", "running_var", "weight", "bias",
                                         "training", "momentum", "eps"), "F.batch_norm")
        rm = a.get("running_mean")
        return _bn_forward(ctx, call.inputs[0], call.tangents[0],
                           bool(a.get("training", False)) or rm is None, rm, a.get("running_var"),
                           a.get("weight"), a.get("bias"), a.get("eps", 1e-5))

    def backward(self, ctx, g, c):
        return [_bn_backward(ctx, g, c)] + [None] * (ctx.n_inputs - 1)


class LayerNormRule:
    def forward(self, call, ctx):
        m = call.module
        return _layer_norm_forward(ctx, call.inputs[0], call.tangents[0],
                                   len(m.normalized_shape), m.eps, m.weight, m.bias)

    def backward(self, ctx, g, c):
        return [_norm_backward(ctx, g, c)]


class GroupNormRule:
    def forward(self, call, ctx):
        m = call.module
        x, t = call.inputs[0], call.tangents[0]
        shape = x.shape
        grouped = (shape[0], m.num_groups, shape[1] // m.num_groups) + tuple(shape[2:])
        dims = list(range(2, len(grouped)))
        y, t_y = _NormCore.forward(ctx, x, t, dims, m.eps, _channel_view(m.weight, x),
                                   _channel_view(m.bias, x), lambda v: v.reshape(grouped),
                                   lambda v: v.reshape(shape))
        _keep_for_score(ctx, y, (1,))
        return y, t_y

    def backward(self, ctx, g, c):
        return [_norm_backward(ctx, g, c)]


class FunctionalLayerNormRule:
    """``F.layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5)``; weight/bias are
    not moved by δθ (they must not depend on θ). Records the channel scores of the scored LN
    layer whose weight it uses (capture sets ``ctx.layer``)."""

    records_norm = True

    def forward(self, call, ctx):
        a = _functional_args(call, ctx, ("input", "normalized_shape", "weight", "bias", "eps"),
                             "F.layer_norm")
        return _layer_norm_forward(ctx, call.inputs[0], call.tangents[0],
                                   len(tuple(a["normalized_shape"])), a.get("eps", 1e-5),
                                   a.get("weight"), a.get("bias"))

    def backward(self, ctx, g, c):
        return [_norm_backward(ctx, g, c)] + [None] * (ctx.n_inputs - 1)


register_module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)(BatchNormRule())
register_module(nn.LayerNorm)(LayerNormRule())
register_module(nn.GroupNorm)(GroupNormRule())
register_function(F.layer_norm)(FunctionalLayerNormRule())
register_function(F.batch_norm)(FunctionalBatchNormRule())
