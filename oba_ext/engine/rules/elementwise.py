"""Pointwise activations ``y = σ(a)`` (SPEC §3):

    T_y = σ'(a)·T_a,   G_a = σ'(a)·G,   C_a = σ'(a)·C  (+ σ''(a)·T_a·G for ``exact``).

Each activation is one function ``(x, opts, want_d2) -> (y, σ', σ'' or None)`` (σ'' = None
when it is zero, e.g. ReLU), registered for its module, functional and tensor-method forms
(in-place variants compute out of place: the sweep never mutates a value). Derivatives follow
PyTorch's own backward formulas at the kinks (ReLU'(0) = 0, Hardswish'(±3) as in autograd).
"""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from . import register_function, register_method, register_module
from .pairs import as_pair, halves, new_pair

_SQRT_2PI_INV = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _relu(x, o, d2):
    return torch.relu(x), (x > 0).to(x.dtype), None


def _hardtanh(x, o, d2):
    lo, hi = o.get("min_val", -1.0), o.get("max_val", 1.0)
    return torch.clamp(x, lo, hi), ((x > lo) & (x < hi)).to(x.dtype), None


def _leaky_relu(x, o, d2):
    s = o.get("negative_slope", 0.01)
    pos = x > 0
    one, slope = x.new_ones(()), x.new_full((), s)  # in x's dtype (Python floats give float32)
    return torch.where(pos, x, x * s), torch.where(pos, one, slope), None


def _gelu_tanh_parts(x):
    """(tanh(u), sech²(u), du/dx) of GELU's tanh approximation ``0.5·x·(1 + tanh(u))``,
    ``u = √(2/π)·(x + 0.044715·x³)``."""
    k = 0.044715
    u = _SQRT_2_OVER_PI * (x + k * x ** 3)
    du = _SQRT_2_OVER_PI * (1 + 3 * k * x * x)
    th = torch.tanh(u)
    return th, 1 - th * th, du


def _gelu(x, o, d2):
    if o.get("approximate", "none") == "tanh":
        th, sech2, du = _gelu_tanh_parts(x)
        y = 0.5 * x * (1 + th)
        d1 = 0.5 * (1 + th) + 0.5 * x * sech2 * du
        return y, d1, (_gelu_d2(x, o) if d2 else None)
    # y and σ' = Φ(x) + x·φ(x) from ATen's fused gelu / gelu_backward (one pass each; the
    # ten-op erf/exp formula was ~9% of a ViT's oba sweep on the CPU). The rule's fused path
    # (_ATEN_BACKWARD) computes neither σ' nor this y; it calls _gelu_d2 alone for exact.
    y = F.gelu(x)
    d1 = torch.ops.aten.gelu_backward(torch.ones_like(x), x)
    return y, d1, (_gelu_d2(x, o) if d2 else None)


def _gelu_d2(x, o):
    """GELU's σ''(x): φ(x)·(2 − x²) (erf form; in place, two temporaries instead of seven:
    a ViT's exact sweep spent ~8% of its CPU time allocating and filling them), or the
    tanh approximation's."""
    if o.get("approximate", "none") == "tanh":
        th, sech2, du = _gelu_tanh_parts(x)
        ddu = _SQRT_2_OVER_PI * 6 * 0.044715 * x
        return sech2 * du + 0.5 * x * (sech2 * ddu - 2 * th * sech2 * du * du)
    xx = x * x
    dd = xx.mul(-0.5).exp_().mul_(_SQRT_2PI_INV)
    return dd.mul_(xx.neg_().add_(2.0))


def _silu_d2(x, o):
    """SiLU's σ''(x) = s(1 − s)(2 + x(1 − 2s)), s = sigmoid(x)."""
    s = torch.sigmoid(x)
    return s * (1 - s) * (2 + x * (1 - 2 * s))


def _silu(x, o, d2):
    s = torch.sigmoid(x)
    d1 = s * (1 + x * (1 - s))
    return x * s, d1, (_silu_d2(x, o) if d2 else None)


def _sigmoid(x, o, d2):
    s = torch.sigmoid(x)
    d1 = s * (1 - s)
    return s, d1, (d1 * (1 - 2 * s) if d2 else None)


def _tanh(x, o, d2):
    y = torch.tanh(x)
    d1 = 1 - y * y
    return y, d1, (-2 * y * d1 if d2 else None)


def _hardswish(x, o, d2):
    # autograd: 0 for x < -3, x/3 + 1/2 for -3 <= x <= 3, 1 for x > 3
    d1 = torch.where(x < -3, 0.0, torch.where(x <= 3, x / 3 + 0.5, 1.0)).to(x.dtype)
    return F.hardswish(x), d1, (((x > -3) & (x < 3)).to(x.dtype) / 3 if d2 else None)


def _hardsigmoid(x, o, d2):
    return F.hardsigmoid(x), ((x > -3) & (x < 3)).to(x.dtype) / 6, None


ACTIVATIONS: Dict[str, Callable] = {
    "relu": _relu, "hardtanh": _hardtanh, "leaky_relu": _leaky_relu, "gelu": _gelu,
    "silu": _silu, "sigmoid": _sigmoid, "tanh": _tanh, "hardswish": _hardswish,
    "hardsigmoid": _hardsigmoid,
}

#: activations with an ATen backward op ``bw(v, x) = σ'(x)·v`` (one pass, σ' never
#: materialized): name -> (forward ``out=`` op, backward ``grad_input=`` op, σ''), the ops
#: taking the activation's options as keywords. The rule's fused path keeps x instead of
#: σ'(x) and computes ``T_y``, ``G_a``, ``C_a`` with ``bw``; it is taken when keeping x costs
#: no more than σ' (:meth:`ActivationRule._fused_ok`): on torchvision's ViT (6×384, CPU, one
#: thread) it removed the ones/σ'/product passes of the forward and 37 MB of saved state.
_ATEN_BACKWARD = {
    "gelu": (lambda x, o, out: torch.ops.aten.gelu.out(
                 x, approximate=o.get("approximate", "none"), out=out),
             lambda v, x, o, out: torch.ops.aten.gelu_backward.grad_input(
                 v, x, approximate=o.get("approximate", "none"), grad_input=out),
             _gelu_d2),
    "silu": (lambda x, o, out: torch.ops.aten.silu.out(x, out=out),
             lambda v, x, o, out: torch.ops.aten.silu_backward.grad_input(v, x, grad_input=out),
             _silu_d2),
}

#: dtypes the ATen activation backward ops take (the CPU kernels have no integer ones)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: keyword names of each activation's options (positional args after x follow this order)
_OPTION_NAMES = {"hardtanh": ("min_val", "max_val"), "leaky_relu": ("negative_slope",),
                 "gelu": ("approximate",)}


class ActivationRule:
    """``ActivationRule(name, options)``; ``options(call) -> dict`` reads module/call options."""

    def __init__(self, name: str, options: Callable):
        self.name, self.act, self.options = name, ACTIVATIONS[name], options

    def forward(self, call, ctx):
        x, t = call.inputs[0], call.tangents[0]
        want_d2 = ctx.want_exact and t is not None
        opts = self.options(call)
        if t is not None and self.name in _PIECEWISE_LINEAR:
            # σ' is a 0/1 mask: write y and T_y = mask·T into the halves of one buffer, so the
            # streams stay paired (rules/pairs.py). The mask is kept in x's dtype: on CPU a
            # bool torch.where / bool·float product measured 10-17x slower than a float product.
            lo, hi = _PIECEWISE_LINEAR[self.name](opts)
            mask = x > lo if hi is None else (x > lo) & (x < hi)
            d1 = mask.to(x.dtype)
            out = new_pair(x)
            y, t_y = halves(out)
            torch.clamp(x, lo, hi, out=y)
            torch.mul(t, d1, out=t_y)
            ctx.d1, ctx.d2t, ctx.bw = d1, None, None
            return y, t_y
        fused = _ATEN_BACKWARD.get(self.name)
        if fused is not None and self._fused_ok(ctx, x):
            return self._forward_fused(ctx, x, t, opts, want_d2, *fused)
        y, d1, d2 = self.act(x, opts, want_d2)
        ctx.d1, ctx.bw = d1, None
        ctx.d2t = d2.mul_(t) if (want_d2 and d2 is not None) else None  # d2 is fresh
        if t is None:
            return y, None
        # y and T_y = σ'·T in the halves of one buffer (paired for the next Linear, which
        # then stacks them without a torch.cat: one copy of y instead of a copy of both)
        y_h, t_h = halves(new_pair(x))
        y_h.copy_(y)
        torch.mul(d1, t, out=t_h)
        return y_h, t_h

    @staticmethod
    def _fused_ok(ctx, x):
        """Whether keeping x costs no more than keeping σ'(x): x's producer keeps x anyway
        (a target Linear/Conv with out scores, ``ctx.input_kept``), or x owns its storage
        (not the half of a two-stream buffer that keeping x would keep whole)."""
        if x.dtype not in _FUSED_DTYPES:
            return False
        kept = getattr(ctx, "input_kept", None)
        if kept and kept[0]:
            return True
        return x.storage_offset() == 0 and x.untyped_storage().nbytes() == x.nbytes

    def _forward_fused(self, ctx, x, t, opts, want_d2, fwd, bw, d2_fn):
        """:data:`_ATEN_BACKWARD` activations: y = σ(x) and T_y = bw(T, x) = σ'(x)·T written
        into the halves of one buffer; x kept for the backward, and ``(x, T)`` by the
        recipe offered to the readers of ``(y, T_y)``: bitwise the same pair again."""
        ctx.x, ctx.opts, ctx.bw, ctx.d1 = x, opts, bw, None
        ctx.d2t = d2_fn(x, opts).mul_(t) if want_d2 else None  # fresh: in place
        if t is None:
            return fwd(x, opts, torch.empty_like(x)), None

        def pair():
            y_h, t_h = halves(new_pair(x))
            fwd(x, opts, y_h)
            bw(t, x, opts, t_h)
            return y_h, t_h
        ctx.recipe_out = pair  # a reader may recompute (y, T_y) from x, T (sweep docstring)
        return pair()

    def backward(self, ctx, g, c):
        if ctx.bw is not None:  # σ'·v by the ATen backward op, both streams paired
            x, opts = ctx.x, ctx.opts
            if c is None:
                ga, ca = ctx.bw(g, x, opts, torch.empty_like(x)), None
            else:
                ga, ca = halves(new_pair(x))
                ctx.bw(g, x, opts, ga)
                ctx.bw(c, x, opts, ca)
        else:
            d1 = ctx.d1
            p = as_pair(g, c)
            if p is not None:  # one product over both paired streams, result paired
                ga, ca = halves((p.view((2,) + tuple(g.shape)) * d1).view(p.shape))
            else:
                ga = g * d1
                ca = c * d1 if c is not None else None
        if ctx.exact and ctx.d2t is not None:
            ca = ctx.d2t * g if ca is None else ca.addcmul_(ctx.d2t, g)  # ca is fresh
        return [(ga, ca)]


#: activations whose σ' is a 0/1 mask: name -> options -> (lower, upper or None) of the
#: open interval where σ' = 1 (and y = clamp(x, lower, upper))
_PIECEWISE_LINEAR = {
    "relu": lambda o: (0.0, None),
    "hardtanh": lambda o: (o.get("min_val", -1.0), o.get("max_val", 1.0)),
}


def _module_opts(*attrs):
    return lambda call: {a: getattr(call.module, a) for a in attrs}


def _call_opts(name):
    names = _OPTION_NAMES.get(name, ())

    def opts(call):
        o = dict(zip(names, call.args[1:]))
        o.update({k: v for k, v in call.kwargs.items() if k in names})
        if name == "hardtanh" and call.fn in (F.relu6,):
            o = {"min_val": 0.0, "max_val": 6.0}
        return o
    return opts


_none = lambda call: {}  # noqa: E731

register_module(nn.ReLU)(ActivationRule("relu", _none))
register_module(nn.Hardtanh)(ActivationRule("hardtanh", _module_opts("min_val", "max_val")))
register_module(nn.LeakyReLU)(ActivationRule("leaky_relu", _module_opts("negative_slope")))
register_module(nn.GELU)(ActivationRule("gelu", _module_opts("approximate")))
register_module(nn.SiLU)(ActivationRule("silu", _none))
register_module(nn.Sigmoid)(ActivationRule("sigmoid", _none))
register_module(nn.Tanh)(ActivationRule("tanh", _none))
register_module(nn.Hardswish)(ActivationRule("hardswish", _none))
register_module(nn.Hardsigmoid)(ActivationRule("hardsigmoid", _none))

register_function(torch.relu, F.relu, torch.relu_, F.relu_)(ActivationRule("relu", _none))
register_function(F.relu6, F.hardtanh, F.hardtanh_)(ActivationRule("hardtanh", _call_opts("hardtanh")))
register_function(F.leaky_relu, F.leaky_relu_)(ActivationRule("leaky_relu", _call_opts("leaky_relu")))
register_function(F.gelu)(ActivationRule("gelu", _call_opts("gelu")))
register_function(F.silu)(ActivationRule("silu", _none))
register_function(torch.sigmoid, F.sigmoid)(ActivationRule("sigmoid", _none))
register_function(torch.tanh, F.tanh)(ActivationRule("tanh", _none))
register_function(F.hardswish)(ActivationRule("hardswish", _none))
register_function(F.hardsigmoid)(ActivationRule("hardsigmoid", _none))

register_method("relu", "relu_")(ActivationRule("relu", _none))
register_method("sigmoid", "sigmoid_")(ActivationRule("sigmoid", _none))
register_method("tanh", "tanh_")(ActivationRule("tanh", _none))
