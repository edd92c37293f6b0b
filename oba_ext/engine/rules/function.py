"""Custom ``torch.autograd.Function`` s as single engine nodes (SPEC §8).

Capture keeps ``Fn.apply(...)`` as one ``call_function`` node whose target is a
:class:`FunctionApply` (instead of tracing into ``Fn.forward`` and losing ``Fn.backward``).
:class:`FunctionRule` runs it with the Function's own derivatives:

    forward:  y = Fn.apply(x);   T_y = Fn.jvp(T_x)       (forward-mode AD; only with tangents;
              an ``exact`` run takes T_y = J T_x from Fn.backward instead, see
              ``_tangent_from_backward``: the exact Hessian is a double backward)
    backward: G_x = Fn.backward(G);   C_x = Fn.backward(C)
              + for ``exact``: ∂/∂x ⟨Fn.backward(G), T_x⟩   (double backward through it)

``oba`` treats the Function as one elementary op (linearized by its jvp/backward; products
inside its forward are hidden by it), as the reference Φ-oracle does. The backward re-runs
``Fn.apply`` with autograd on (the forward keeps only its inputs, not a graph). What a Function
lacks raises :class:`oba_ext.reference.functions.UnsupportedFunctionError` naming it: no
``jvp`` with forward tangents, or a non-differentiable backward for ``exact``.
"""
from __future__ import annotations

import torch
from torch.autograd import forward_ad as fwAD
from torch.utils import _pytree as pytree

from ...reference import functions as _fn
from .autodiff import is_float, unpack_duals


class FunctionApply:
    """Callable node target standing for ``cls.apply``."""

    _cache: dict = {}

    def __init__(self, cls):
        self.cls = cls
        self.__name__ = f"{cls.__name__}.apply"
        self.__qualname__ = f"{getattr(cls, '__qualname__', cls.__name__)}.apply"
        self.__module__ = getattr(cls, "__module__", None)

    @classmethod
    def of(cls, fn_cls) -> "FunctionApply":
        f = cls._cache.get(fn_cls)
        if f is None:
            f = cls._cache[fn_cls] = cls(fn_cls)
        return f

    def __call__(self, *args, **kwargs):
        return self.cls.apply(*args, **kwargs)

    def __repr__(self):
        return f"<autograd.Function {_fn.function_name(self.cls)}.apply>"


class FunctionRule:
    def forward(self, call, ctx):
        cls = call.fn.cls
        n = len(call.inputs)
        diff = [i for i in range(n) if is_float(call.inputs[i]) and call.needs[i]]
        tan_in = [i for i in range(n) if call.tangents[i] is not None and is_float(call.inputs[i])]
        ctx.cls, ctx.diff = cls, diff
        leaves, spec, slots, fn = call._leaves, call._spec, call._slots, call.fn

        def invoke(vals):
            lv = list(leaves)
            for i, v in zip(slots, vals):
                lv[i] = v
            args, kwargs = pytree.tree_unflatten(lv, spec)
            return fn(*args, **kwargs)

        ctx.invoke, ctx.inputs = invoke, list(call.inputs)
        ctx.tans = ([call.tangents[i] for i in range(n)]
                    if ctx.want_exact and tan_in else None)
        if not tan_in:
            return invoke(list(call.inputs)), None
        if ctx.want_exact:
            return self._tangent_from_backward(cls, invoke, call, tan_in)
        if not _fn.has_jvp(cls):
            raise _fn.no_jvp_error(cls)
        with fwAD.dual_level():
            vals = list(call.inputs)
            for i in tan_in:
                vals[i] = fwAD.make_dual(vals[i], call.tangents[i].to(vals[i].dtype))
            out = invoke(vals)
            flat, spec_out = pytree.tree_flatten(out)
            prim, tan = unpack_duals(flat)
        y = pytree.tree_unflatten(prim, spec_out)
        if isinstance(y, torch.Tensor):
            return y, tan[0]
        return y, type(y)(tan) if isinstance(y, (tuple, list)) else None

    @staticmethod
    def _tangent_from_backward(cls, invoke, call, tan_in):
        """``T_y = J T_x`` with ``J`` the transpose of what ``Fn.backward`` computes (the
        double-vjp trick: ``J T = ∂/∂u ⟨Fn.backward(u), T⟩``). ``exact`` uses this and not the
        jvp: the Hessian of the reference path is the double backward, which differentiates
        through ``Fn.backward`` only; it needs a differentiable backward anyway."""
        if _fn.is_once_differentiable(cls):
            raise _fn.not_twice_differentiable_error(cls, "is marked @once_differentiable")
        with torch.enable_grad():
            vals = list(call.inputs)
            xs = []
            for i in tan_in:
                vals[i] = vals[i].detach().requires_grad_(True)
                xs.append(vals[i])
            out = invoke(vals)
            flat, spec_out = pytree.tree_flatten(out)
            idx = [k for k, o in enumerate(flat)
                   if isinstance(o, torch.Tensor) and is_float(o) and o.requires_grad]
            tan = [None] * len(flat)
            if idx:
                us = [torch.zeros_like(flat[k]).requires_grad_(True) for k in idx]
                gx = torch.autograd.grad([flat[k] for k in idx], xs, us, create_graph=True,
                                         allow_unused=True)
                pairs = []
                for x_i, gk in zip(tan_in, gx):
                    if gk is None:
                        continue
                    if _fn.is_error_node(gk) or not gk.requires_grad:
                        raise _fn.not_twice_differentiable_error(
                            cls, "is marked @once_differentiable" if _fn.is_error_node(gk) else
                            "returns a gradient that is not on the autograd graph (detached, or "
                            "computed outside torch)")
                    pairs.append((gk, call.tangents[x_i].to(gk.dtype)))
                if pairs:
                    ty = torch.autograd.grad([p for p, _ in pairs], us, [t for _, t in pairs],
                                             allow_unused=True)
                    for k, t in zip(idx, ty):
                        tan[k] = t.detach() if t is not None else None
        prim = [o.detach() if isinstance(o, torch.Tensor) else o for o in flat]
        y = pytree.tree_unflatten(prim, spec_out)
        if isinstance(y, torch.Tensor):
            return y, tan[0]
        return y, type(y)(tan) if isinstance(y, (tuple, list)) else None

    def backward(self, ctx, g, c):
        cls, diff = ctx.cls, ctx.diff
        result = [None] * len(ctx.inputs)
        if not diff:
            return result
        exact = ctx.exact and ctx.tans is not None
        with torch.enable_grad():
            xs = [ctx.inputs[i].detach().requires_grad_(True) for i in diff]
            vals = list(ctx.inputs)
            for i, x in zip(diff, xs):
                vals[i] = x
            flat_out = pytree.tree_leaves(ctx.invoke(vals))
            gl = g if isinstance(g, (list, tuple)) else [g]
            cl = (c if isinstance(c, (list, tuple)) else [c]) if c is not None else [None] * len(gl)
            outs = [(o, gi, ci) for o, gi, ci in zip(flat_out, gl, cl)
                    if isinstance(o, torch.Tensor) and o.requires_grad and is_float(o)]
            if not outs:
                return result
            go = [gi if gi is not None else torch.zeros_like(o) for o, gi, _ in outs]
            if exact:
                if _fn.is_once_differentiable(cls):
                    raise _fn.not_twice_differentiable_error(cls, "is marked @once_differentiable")
                go = [t.detach().requires_grad_(True) for t in go]  # a differentiable backward
                # returns results on the graph (they are linear in G)
            gx = torch.autograd.grad([o for o, _, _ in outs], xs, go, allow_unused=True,
                                     retain_graph=True, create_graph=exact)
            cx = [None] * len(xs)
            if any(ci is not None for _, _, ci in outs):
                co = [ci if ci is not None else torch.zeros_like(o) for o, _, ci in outs]
                cx = list(torch.autograd.grad([o for o, _, _ in outs], xs, co, allow_unused=True,
                                              retain_graph=exact))
            if exact:
                pairs = []
                for k, (i, gk) in enumerate(zip(diff, gx)):
                    if gk is None:
                        continue
                    if _fn.is_error_node(gk):
                        raise _fn.not_twice_differentiable_error(cls, "is marked @once_differentiable")
                    if not gk.requires_grad:
                        if bool(gk.ne(0).any()):
                            raise _fn.not_twice_differentiable_error(
                                cls, "returns a gradient that is not on the autograd graph "
                                     "(detached, or computed outside torch)")
                        continue
                    t = ctx.tans[i]
                    pairs.append((gk, t if t is not None else torch.zeros_like(gk)))
                if pairs:
                    curv = torch.autograd.grad([p for p, _ in pairs], xs, [t for _, t in pairs],
                                               allow_unused=True)
                    cx = [a if b is None else (b if a is None else a + b)
                          for a, b in zip(cx, curv)]
        for k, i in enumerate(diff):
            gk = gx[k].detach() if gx[k] is not None else None
            ck = cx[k].detach() if cx[k] is not None else None
            if gk is None and ck is None:
                continue
            if gk is None:
                gk = torch.zeros_like(ctx.inputs[i])
            result[i] = (gk, ck)
        return result


FUNCTION_RULE = FunctionRule()
