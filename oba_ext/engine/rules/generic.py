"""The generic rule for ops without a hand-written rule: ``torch.func`` per stream.

    forward:  (y, T_y) = jvp(f, x, T)                       (T = 0 where None)
    backward: G_x = vjp(f, x)(G);  C_x = vjp(f, x)(C)
              + for ``exact``: jvp of ``x ↦ vjp(f, x)(G)`` along T  (the op's own curvature)

It is correct for any op whose ``oba`` linearization is the plain JVP, i.e. any op that is
not a product of two θ-dependent activations (those need the product rule: see
``arith.BilinearRule`` and ``rules.UNSUPPORTED``). Only floating inputs that carry a tangent
or need a cotangent are differentiated; tuple outputs are supported (``G``/``C`` per element,
``None`` = zero). The first use of each op warns once, naming it.
"""
from __future__ import annotations

import warnings

import torch
from torch.utils import _pytree as pytree

_WARNED = set()


def op_name(call) -> str:
    node = call.node
    if node.op == "call_module":
        return f"module {type(call.module).__name__} ({node.target})"
    if node.op == "call_method":
        return f"tensor method .{node.target}()"
    t = node.target
    return f"function {getattr(t, '__module__', '') or ''}.{getattr(t, '__name__', repr(t))}"


def warn_once(call):
    name = op_name(call).split(" (")[0]
    if name not in _WARNED:
        _WARNED.add(name)
        warnings.warn(f"oba_ext engine: no rule for {name}; using the generic torch.func rule "
                      f"(correct, but slower)", stacklevel=4)


def _zeros_like_tree(ref):
    return pytree.tree_map(lambda r: torch.zeros_like(r) if isinstance(r, torch.Tensor) else r, ref)


def _fill(cot, ref):
    """Cotangent structure like ``ref`` with ``None`` leaves replaced by zeros."""
    if isinstance(ref, torch.Tensor):
        return torch.zeros_like(ref) if cot is None else cot
    if isinstance(ref, (tuple, list)):
        cot = cot if cot is not None else [None] * len(ref)
        return type(ref)(_fill(c, r) for c, r in zip(cot, ref))
    return cot


class GenericRule:
    def __init__(self, warn: bool = True):
        self.warn = warn

    def forward(self, call, ctx):
        if self.warn:
            warn_once(call)
        active = [i for i, x in enumerate(call.inputs)
                  if x.is_floating_point() or x.is_complex()]
        active = [i for i in active if call.tangents[i] is not None or call.needs[i]]
        base = list(call.inputs)

        def f(*xs):
            vals = list(base)
            for i, v in zip(active, xs):
                vals[i] = v
            return call.invoke(vals)

        primals = tuple(call.inputs[i] for i in active)
        tangents = [call.tangents[i] for i in active]
        ctx.f, ctx.active, ctx.primals, ctx.n_inputs = f, active, primals, len(call.inputs)
        if any(t is not None for t in tangents):
            tans = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
            y, t_y = torch.func.jvp(f, primals, tans)
            ctx.tans = tans if ctx.want_exact else None
        else:
            y, t_y = f(*primals), None
            ctx.tans = None
        ctx.y_ref = pytree.tree_map(lambda v: v.detach() if isinstance(v, torch.Tensor) else v, y)
        return y, t_y

    def backward(self, ctx, g, c):
        f, primals = ctx.f, ctx.primals
        out = [None] * ctx.n_inputs
        if not primals:
            return out
        g = _fill(g, ctx.y_ref)
        _, vjp_fn = torch.func.vjp(f, *primals)
        gs = vjp_fn(g)
        cs = vjp_fn(_fill(c, ctx.y_ref)) if c is not None else None
        if ctx.exact and ctx.tans is not None:
            def gx_of(*xs):
                return torch.func.vjp(f, *xs)[1](g)
            _, extra = torch.func.jvp(gx_of, primals, ctx.tans)
            cs = extra if cs is None else tuple(a + b for a, b in zip(cs, extra))
        for k, i in enumerate(ctx.active):
            out[i] = (gs[k], cs[k] if cs is not None else None)
        return out


#: the shared instances the sweep uses
GENERIC = GenericRule(warn=True)
GENERIC_QUIET = GenericRule(warn=False)
