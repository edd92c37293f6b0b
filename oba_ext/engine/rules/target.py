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

Any direction (``ctx.direction = {"weight": V, "bias": v_b}``, set by the sweep for curvature products, README
"Curvature products"; ``None`` entries are zeros). ``δW = V`` is no longer ``W``, so the two
terms that were free for ``δθ = θ`` cost one GEMM/conv each:
    forward   ``T_Y = W⊛T_X + V⊛X + v_b``                     (one more GEMM: ``V⊛X``)
    backward  ``G_X = Wᵀ⊛G``, ``C_X = Wᵀ⊛C + Vᵀ⊛G``           (one more GEMM: ``Vᵀ⊛G``)
    product   ``(Hv)_W = Gᵀ T_X + Cᵀ X``, ``(Hv)_b = Σ C``    (the weight gradient of ``[G; C]``
              against ``[T_X; X]``; ``H`` is ``Ĥ`` in ``oba`` mode)
With ``ctx.mode = None`` (the generalized Gauss-Newton product: the backward sweep carries only
``C = J_zᵀ H_loss J v`` as its one stream) ``(GGN v)_W = Cᵀ X`` and ``(GGN v)_b = Σ C``.
Scores along the direction (``ctx.product`` false: ``s_i = v_i (Hv)_i`` summed per channel;
SPEC §5 with ``δθ = v``), from ``P = V⊛X + v_b`` and ``Q = V⊛T_X`` kept from the forward:
    out_o  = Σ [G⊙Q + C⊙P]_o        (``V⊛[X; T_X]`` on the stacked streams: no extra GEMM unit
                                      beyond ``V⊛X`` when only ``out`` is asked)
    in_j   = Σ [T_X⊙(VᵀG) + X⊙(VᵀC)]_j
    weight = V ⊙ (Gᵀ T_X + Cᵀ X),  bias = v_b ⊙ Σ C
Subclasses provide the op: :meth:`apply` (no bias), :meth:`input_grad`, :meth:`weight_score`,
:meth:`weight_product`, :meth:`channel_dims`, :meth:`bias_view`.
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

    def weight_product(self, module, w, grads, inputs):  # pragma: no cover - abstract
        """``Σ_k grads[k]ᵀ ⊛ inputs[k]``: the weight gradient, shaped like ``w`` (no ``⊙w``)."""
        raise NotImplementedError

    def input_and_weight_grad(self, module, g, x, w):
        """``(Wᵀ⊛g, gᵀ⊛x)``: the input gradient of ``g`` and the weight gradient of ``g``
        against ``x`` (both batch-stacked), in one call where the op allows."""
        return (self.input_grad(module, g, w, x.shape),
                self.weight_product(module, w, [g], [x]))

    def channel_dims(self, y):  # (out channel dim of Y, in channel dim of X)
        raise NotImplementedError  # pragma: no cover - abstract

    def bias_view(self, b, y):
        raise NotImplementedError  # pragma: no cover - abstract

    def forward(self, call, ctx):
        m = call.module
        x, t = call.inputs[0], call.tangents[0]
        w, b = m.weight, m.bias
        target = ctx.layer is not None
        if target and getattr(ctx, "direction", None) is not None:
            return self._forward_direction(ctx, m, x, t, w, b)
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
                ctx.keeps_output = True  # a reader may keep y for free (sweep docstring)
            if "in" in keys or "weight" in keys:
                recipes = getattr(ctx, "input_recipes", None)
                recipe = recipes[0] if recipes and t is not None else None
                # keep the recipe of [X; T] rather than the pair when the producer offers one
                # (sweep docstring); recomputed at the start of the backward
                ctx.x, ctx.t, ctx.recipe = (None, None, recipe) if recipe else (x, t, None)
        return y, t_y

    def backward(self, ctx, g, c):
        m, w = ctx.module, ctx.w
        target = ctx.layer is not None
        if target and getattr(ctx, "direction", None) is not None:
            return self._backward_direction(ctx, g, c)
        keys = ctx.keys if target else ()
        recipe = getattr(ctx, "recipe", None)
        if recipe is None:
            return self._backward_streams(ctx, m, w, target, keys, g, c)
        ctx.x, ctx.t = recipe()  # the input pair, recomputed (forward), for this pass only
        try:
            return self._backward_streams(ctx, m, w, target, keys, g, c)
        finally:
            ctx.x = ctx.t = None  # a later pass (oba then exact) recomputes it again

    def _backward_streams(self, ctx, m, w, target, keys, g, c):
        gx = cx = None
        if (target and ctx.mode is not None and c is not None and not ctx.needs[0]
                and not ctx.first and "in" in keys and ctx.t is None):
            # data input (T_X = 0, no cotangent wanted): in_j = Σ X⊙(C_X − G_X) = Σ X⊙WᵀC,
            # one single-stream input gradient instead of a stacked one
            u = self.input_grad(m, c, w, ctx.x_shape)
            _, idim = self.channel_dims(ctx.x)
            ctx.record(ctx.mode, "in", kernels.channel_first_order_reduce(u, ctx.x, idim))
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
            _record_channel_scores(ctx, "out", g, ctx.t_y, c, ctx.y, od)
        if "in" in keys and not skip_in:
            _, idim = self.channel_dims(ctx.x)
            _record_channel_scores(ctx, "in", gx, ctx.t, cx, ctx.x, idim)
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


    # ------------------------------------------------------------ any direction (docstring)
    def _forward_direction(self, ctx, m, x, t, w, b):
        V, vb = ctx.direction.get("weight"), ctx.direction.get("bias")
        n = x.shape[0]
        if t is None:
            y, wt = self.apply(m, x, w), None
        else:
            s = self.apply(m, stack_pair(x, t), w)
            y, wt = s[:n], s[n:]
        if b is not None:
            y = y + self.bias_view(b, y) if t is None else y.add_(self.bias_view(b, y))
        keys = ctx.keys
        want_q = not ctx.product and "out" in keys and t is not None and V is not None
        p = q = None
        if V is not None:
            if want_q:  # V⊛[X; T_X] in one GEMM/conv: P and Q
                s2 = self.apply(m, stack_pair(x, t), V)
                p, q = s2[:n], s2[n:]
            else:
                p = self.apply(m, x, V)
        if vb is not None:
            bv = self.bias_view(vb, y)
            p = p.add_(bv) if p is not None else bv.expand_as(y).contiguous()
        if wt is None:
            t_y = p
        elif p is None:
            t_y = wt
        else:
            t_y = wt.add_(p)  # T_Y = W⊛T_X + V⊛X + v_b (in the buffer: [Y; T_Y] stay paired)
        ctx.module, ctx.w, ctx.x_shape = m, w, x.shape
        ctx.x, ctx.t, ctx.V, ctx.vb = x, t, V, vb
        if not ctx.product and "out" in keys:
            ctx.p, ctx.q = p, q  # P: None when V and v_b are both zero
        return y, t_y

    def _backward_direction(self, ctx, g, c):
        m, w, V, vb = ctx.module, ctx.w, ctx.V, ctx.vb
        keys, mode = ctx.keys, ctx.mode
        n = ctx.x_shape[0]
        x_shape2 = (2 * n,) + tuple(ctx.x_shape[1:])
        need_x = ctx.needs[0]
        in_score = not ctx.product and "in" in keys and mode is not None
        gx = cx = vg = vc = None
        ctx.fused_product = None
        if need_x:
            if mode is None or c is None:
                gx = self.input_grad(m, g, w, ctx.x_shape)
            elif ctx.product and "weight" in keys and ctx.t is not None:
                # [WᵀG; WᵀC] and the product Σ GᵀT_X + CᵀX from one backward call on the
                # stacked streams [G; C] against [T_X; X]
                s, ctx.fused_product = self.input_and_weight_grad(
                    m, stack_pair(g, c), stack_pair(ctx.t, ctx.x), w)
                gx, cx = s[:n], s[n:]
            else:  # [WᵀG; WᵀC] in one GEMM/conv
                s = self.input_grad(m, stack_pair(g, c), w, x_shape2)
                gx, cx = s[:n], s[n:]
        if V is not None and mode is not None and (need_x or in_score):
            if in_score and c is not None:  # [VᵀG; VᵀC]
                s = self.input_grad(m, stack_pair(g, c), V, x_shape2)
                vg, vc = s[:n], s[n:]
            else:
                vg = self.input_grad(m, g, V, ctx.x_shape)
        if need_x and mode is not None and vg is not None:
            cx = vg if cx is None else cx.add_(vg)  # C_X = WᵀC + VᵀG
        self._direction_records(ctx, m, w, g, c, vg, vc)
        if not need_x:
            return [None]
        return [(gx, cx)]

    def _direction_records(self, ctx, m, w, g, c, vg, vc):
        keys, mode, record = ctx.keys, ctx.mode, ctx.record
        V, vb, x, t = ctx.V, ctx.vb, ctx.x, ctx.t
        q_name = "hvp" if ctx.product else mode
        b = m.bias
        acc = _acc_dtype(g)
        if "weight" in keys:
            grads, inputs = [], []
            if mode is None:  # GGN: the one backward stream is C (passed as g)
                grads, inputs = [g], [x]
            else:
                if c is not None:
                    grads.append(c)
                    inputs.append(x)
                if t is not None:
                    grads.append(g)
                    inputs.append(t)
            if ctx.product:
                prod = ctx.fused_product
                if prod is None:
                    prod = (self.weight_product(m, w, grads, inputs) if grads
                            else torch.zeros_like(w, dtype=acc))
                record(q_name, "weight", prod)
            elif V is None or not grads:
                record(q_name, "weight", torch.zeros_like(w, dtype=acc))
            else:
                record(q_name, "weight", V.to(acc) * self.weight_product(m, w, grads, inputs))
        if "bias" in keys and b is not None:
            od, _ = self.channel_dims(g)
            dims = [i for i in range(g.dim()) if i != od]
            stream = g if mode is None else c
            sc = (stream.sum(dims, dtype=acc) if stream is not None
                  else torch.zeros_like(b, dtype=acc))
            if ctx.product:
                record(q_name, "bias", sc)
            else:
                record(q_name, "bias", vb.to(acc) * sc if vb is not None
                       else torch.zeros_like(b, dtype=acc))
        if ctx.product:
            return
        if "out" in keys:
            od, _ = self.channel_dims(g)
            p, q = ctx.p, ctx.q
            if p is None:
                record(mode, "out", torch.zeros(g.shape[od], dtype=acc, device=w.device))
            else:  # Σ G⊙Q + C⊙P  as  Σ a⊙(b−d) + c⊙d  with a=G, b=Q+P, c=C, d=P
                second, _ = kernels.channel_score_reduce(g, p if q is None else q + p, c, p, od)
                record(mode, "out", second)
        if "in" in keys:
            _, idim = self.channel_dims(x)
            s = None
            if vg is not None and t is not None:
                s = kernels.channel_first_order_reduce(vg, t, idim)
            if vc is not None:
                s2 = kernels.channel_first_order_reduce(vc, x, idim)
                s = s2 if s is None else s + s2
            if s is None:
                s = torch.zeros(x.shape[idim], dtype=acc, device=x.device)
            record(mode, "in", s)


def _record_channel_scores(ctx, key, grad, tangent, cot, value, dim):
    """Record the channel scores of ``key`` ("out": ``grad, tangent, cot, value = G, T_Y, C, Y``;
    "in": ``G_X, T_X, C_X, X``) summed over every dim but ``dim`` (module docstring):
    ``Σ [grad⊙(tangent−value) + cot⊙value]`` under ``ctx.mode`` and, on the first sweep, the
    first-order ``Σ [grad⊙value]`` under "taylor"; with ``ctx.mode = None`` the first-order one
    only (``tangent``/``cot`` unused). ``None`` streams are zeros."""
    if ctx.mode is None:
        ctx.record("taylor", key, kernels.channel_first_order_reduce(grad, value, dim))
        return
    second, fst = kernels.channel_score_reduce(grad, tangent, cot, value, dim)
    ctx.record(ctx.mode, key, second)
    if ctx.first:
        ctx.record("taylor", key, fst)


def _acc_dtype(x):
    """Channel sums accumulate in float64 for float64 streams, else float32 (like the ops)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
