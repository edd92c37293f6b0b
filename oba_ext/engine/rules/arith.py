"""Arithmetic joins: residual add/sub, concat/stack, negation, division by a constant, and
products of activations (SPEC §3 product rule, the same in ``oba`` and ``exact``):

    y = a ⊙ b (or a @ b):  T_y = T_a⊙b + a⊙T_b
                           G_a = G⊙b,  C_a = C⊙b + G⊙T_b   (and symmetrically for b)

Broadcasting is undone with ``sum_to_size``. Matmul-like products (``@``, ``matmul``, ``bmm``,
``einsum`` of two operands) use the same rule through ``torch.func.vjp`` of the op itself: the
cross terms ``(G⊙T_b, T_a⊙G)`` are one VJP of the op at ``(T_a, T_b)``. With more than two
θ-dependent operands (einsum of three, ``F.linear`` with a θ-dependent weight and a bias) the
op is written out product by product (:class:`.products.DecomposedRule`).
"""
from __future__ import annotations

import operator

import torch

from . import register_function, register_method
from .generic import GENERIC_QUIET
from .pairs import as_pair, halves


def _sum_to(v, shape):
    return v if v.shape == shape else v.sum_to_size(shape)


def _add_terms(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class AddRule:
    """``a + b``, ``a - b`` (``sign=-1``), ``torch.add(a, b, alpha=k)``; scalars are constants."""

    def __init__(self, sign: float = 1.0):
        self.sign = sign

    def forward(self, call, ctx):
        alpha = call.kwargs.get("alpha", 1)
        if len(call.args) > 2 and not isinstance(call.args[2], torch.Tensor):
            alpha = call.args[2]
        # coefficient of each tensor input: first positional arg +1, second sign*alpha
        coef = [1.0 if slot == 0 else self.sign * alpha for slot in call.positions]
        if (len(call.inputs) == 2 and coef == [1.0, 1.0] and not call.kwargs
                and call.inputs[0].shape == call.inputs[1].shape):
            # residual join of two paired stream sets: one add over both, result paired
            p1 = as_pair(call.inputs[0], call.tangents[0])
            p2 = as_pair(call.inputs[1], call.tangents[1])
            if p1 is not None and p2 is not None:
                ctx.coef, ctx.shapes = coef, [x.shape for x in call.inputs]
                return halves(p1 + p2)
        y = call.invoke(call.inputs)
        t_y = None
        for k, t in zip(coef, call.tangents):
            if t is not None:
                term = t if k == 1 else t * k
                t_y = term if t_y is None else t_y + term
        if t_y is not None and t_y.shape != y.shape:
            t_y = t_y.expand(y.shape)
        ctx.coef = coef
        ctx.shapes = [x.shape for x in call.inputs]
        return y, t_y

    def backward(self, ctx, g, c):
        out = []
        for k, shape, need in zip(ctx.coef, ctx.shapes, ctx.needs):
            if not need:
                out.append(None)
                continue
            gi = _sum_to(g if k == 1 else g * k, shape)
            ci = None if c is None else _sum_to(c if k == 1 else c * k, shape)
            out.append((gi, ci))
        return out


class MulRule:
    """Elementwise ``a * b`` with broadcasting (product rule when both are θ-dependent)."""

    def forward(self, call, ctx):
        if len(call.inputs) == 1:  # tensor times a Python scalar: linear
            x, t = call.inputs[0], call.tangents[0]
            ctx.single = True
            ctx.scale = call.args[1] if call.positions[0] == 0 else call.args[0]
            ctx.shape = x.shape
            return x * ctx.scale, (t * ctx.scale if t is not None else None)
        if len(call.inputs) != 2:
            raise ValueError(f"{ctx.name}: mul with {len(call.inputs)} tensor inputs")
        ctx.single = False
        a, b = call.inputs
        ta, tb = call.tangents
        y = a * b
        t_y = _add_terms(ta * b if ta is not None else None, a * tb if tb is not None else None)
        if t_y is not None and t_y.shape != y.shape:
            t_y = t_y.expand(y.shape)
        ctx.a, ctx.b, ctx.ta, ctx.tb = a, b, ta, tb
        return y, t_y

    def backward(self, ctx, g, c):
        if ctx.single:
            return [(g * ctx.scale, c * ctx.scale if c is not None else None)]
        a, b, ta, tb = ctx.a, ctx.b, ctx.ta, ctx.tb
        out = []
        for need, other, t_other, shape in ((ctx.needs[0], b, tb, a.shape),
                                            (ctx.needs[1], a, ta, b.shape)):
            if not need:
                out.append(None)
                continue
            gi = _sum_to(g * other, shape)
            ci = None
            if ctx.mode is not None:
                ci = _add_terms(c * other if c is not None else None,
                                g * t_other if t_other is not None else None)
                ci = _sum_to(ci, shape) if ci is not None else None
            out.append((gi, ci))
        return out


class BilinearRule:
    """Any op bilinear in its two tensor inputs (matmul, bmm, einsum with two operands)."""

    def forward(self, call, ctx):
        if len(call.inputs) != 2:
            streams = sum(1 for x, t, n in zip(call.inputs, call.tangents, call.needs)
                          if x.is_floating_point() and (t is not None or n))
            if streams > 1:
                # three or more operands (einsum), or F.linear/conv with a θ-dependent weight
                # and a bias: the written-out form, product by product (rules/products.py)
                from .products import DECOMPOSED
                ctx.delegate = DECOMPOSED
                return DECOMPOSED.forward(call, ctx)
            ctx.delegate = GENERIC_QUIET  # one tensor operand: linear, the JVP/VJP is exact
            return GENERIC_QUIET.forward(call, ctx)
        ctx.delegate = None
        a, b = call.inputs
        ta, tb = call.tangents
        y = call.invoke([a, b])
        t_y = _add_terms(call.invoke([ta, b]) if ta is not None else None,
                         call.invoke([a, tb]) if tb is not None else None)
        ctx.call, ctx.a, ctx.b, ctx.ta, ctx.tb = call, a, b, ta, tb
        return y, t_y

    def backward(self, ctx, g, c):
        if ctx.delegate is not None:
            return ctx.delegate.backward(ctx, g, c)
        call, a, b, ta, tb = ctx.call, ctx.a, ctx.b, ctx.ta, ctx.tb
        f = lambda u, v: call.invoke([u, v])  # noqa: E731
        _, vjp_fn = torch.func.vjp(f, a, b)
        ga, gb = vjp_fn(g)
        ca = cb = None
        if ctx.mode is not None:
            if c is not None:
                ca, cb = vjp_fn(c)
            if ta is not None or tb is not None:
                u = ta if ta is not None else torch.zeros_like(a)
                v = tb if tb is not None else torch.zeros_like(b)
                _, cross_fn = torch.func.vjp(f, u, v)
                xa, xb = cross_fn(g)  # (G·T_bᵀ-like, T_aᵀ·G-like)
                ca = _add_terms(ca, xa if tb is not None else None)
                cb = _add_terms(cb, xb if ta is not None else None)
        return [(ga, ca) if ctx.needs[0] else None, (gb, cb) if ctx.needs[1] else None]


class CatRule:
    """``torch.cat(tensors, dim)`` / ``torch.stack(tensors, dim)``."""

    def __init__(self, stack: bool):
        self.stack = stack

    def forward(self, call, ctx):
        dim = call.args[1] if len(call.args) > 1 else call.kwargs.get("dim", 0)
        fn = torch.stack if self.stack else torch.cat
        xs = call.inputs
        y = fn(xs, dim)
        t_y = None
        if any(t is not None for t in call.tangents):
            t_y = fn([t if t is not None else torch.zeros_like(x)
                      for x, t in zip(xs, call.tangents)], dim)
        d = dim % y.dim()
        ctx.dim = d
        ctx.sizes = [1 if self.stack else x.shape[d] for x in xs]
        return y, t_y

    def _split(self, ctx, v):
        parts = torch.split(v, ctx.sizes, ctx.dim)
        return [p.squeeze(ctx.dim) for p in parts] if self.stack else list(parts)

    def backward(self, ctx, g, c):
        gs = self._split(ctx, g)
        cs = self._split(ctx, c) if c is not None else [None] * len(gs)
        return [(gi, ci) if need else None for gi, ci, need in zip(gs, cs, ctx.needs)]


class ScaleRule:
    """``-a`` and ``a / k`` with ``k`` a constant (Python number or θ-independent tensor)."""

    def __init__(self, kind: str):
        self.kind = kind

    def forward(self, call, ctx):
        if self.kind == "div" and (call.positions[0] != 0 or any(call.needs[1:])
                                   or any(t is not None for t in call.tangents[1:])):
            ctx.delegate = GENERIC_QUIET  # θ-dependent divisor: not bilinear, plain JVP/VJP
            return GENERIC_QUIET.forward(call, ctx)
        ctx.delegate = None
        x, t = call.inputs[0], call.tangents[0]
        if self.kind == "neg":
            ctx.k = -1.0
        else:
            k = call.args[1] if len(call.args) > 1 else call.kwargs["other"]
            ctx.k = 1.0 / k
        ctx.shape, ctx.n_inputs = x.shape, len(call.inputs)
        y = call.invoke(call.inputs)
        return y, (t * ctx.k if t is not None else None)

    def backward(self, ctx, g, c):
        if ctx.delegate is not None:
            return ctx.delegate.backward(ctx, g, c)
        k = ctx.k
        gi = _sum_to(g * k, ctx.shape)
        ci = _sum_to(c * k, ctx.shape) if c is not None else None
        return [(gi, ci)] + [None] * (ctx.n_inputs - 1)


register_function(operator.add, operator.iadd, torch.add)(AddRule(1.0))
register_method("add", "add_")(AddRule(1.0))
register_function(operator.sub, operator.isub, torch.sub)(AddRule(-1.0))
register_method("sub", "sub_")(AddRule(-1.0))
register_function(operator.mul, operator.imul, torch.mul)(MulRule())
register_method("mul", "mul_")(MulRule())
register_function(operator.matmul, torch.matmul, torch.bmm, torch.mm, torch.einsum)(BilinearRule())
# functional Linear/Conv outside a target module (weights that are not target parameters):
# bilinear in (x, w); with a bias operand the generic rule handles the single live operand
import torch.nn.functional as F  # noqa: E402
register_function(F.linear, F.conv1d, F.conv2d)(BilinearRule())
register_method("matmul", "bmm", "mm")(BilinearRule())
register_function(torch.cat, torch.concat)(CatRule(stack=False))
register_function(torch.stack)(CatRule(stack=True))
register_function(operator.neg, torch.neg)(ScaleRule("neg"))
register_method("neg")(ScaleRule("neg"))
register_function(operator.truediv, torch.div)(ScaleRule("div"))
register_method("div")(ScaleRule("div"))
