"""nn.Linear (target or not), for inputs (..., C_in) — 2-D (B, C) or token-shaped (B, T, C).

Stacking along the flattened leading dims: ``[X; T]`` is ``(2·N, C_in)`` with ``N = Π lead``.
Channels: out = last dim of Y, in = last dim of X.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from . import register_function, register_module, register_module_lazy
from .generic import GENERIC_QUIET
from .target import TwoStreamLayerRule


class LinearRule(TwoStreamLayerRule):
    def apply(self, module, x, w):
        return F.linear(x, w)

    def input_grad(self, module, g, w, x_shape):
        return (g.reshape(-1, g.shape[-1]) @ w).reshape(x_shape)

    def weight_score(self, module, w, grads, inputs):
        return kernels.linear_weight_score(w, grads, inputs)

    def weight_product(self, module, w, grads, inputs):
        # Σ_k G_kᵀ X_k as accumulating GEMMs over the flattened leading dims (no stacking copy)
        out = None
        for g, x in zip(grads, inputs):
            g2, x2 = g.reshape(-1, w.shape[0]), x.reshape(-1, w.shape[1])
            out = g2.t() @ x2 if out is None else out.addmm_(g2.t(), x2)
        return out

    def channel_dims(self, y):
        return y.dim() - 1, y.dim() - 1

    def bias_view(self, b, y):
        return b

    def forward(self, call, ctx):
        if call.inputs[0].dim() < 2:
            raise ValueError(f"{ctx.name}: the engine needs a batched input (N, ..., C_in) for "
                             f"nn.Linear, got shape {tuple(call.inputs[0].shape)}")
        return super().forward(call, ctx)


register_module(nn.Linear)(LinearRule())


class HFConv1DRule(LinearRule):
    """Hugging Face ``transformers.pytorch_utils.Conv1D``: ``Y = X W + b`` with W (C_in, C_out),
    the Linear rule on ``Wᵀ`` (kind ``hf_conv1d``, :mod:`oba_ext.layers.hf_conv1d`). Every
    weight-shaped result is (C_in, C_out) like the module's weight; a direction ``V`` has that
    shape too."""

    def apply(self, module, x, w):
        return torch.matmul(x, w)

    def input_grad(self, module, g, w, x_shape):
        return (g.reshape(-1, g.shape[-1]) @ w.t()).reshape(x_shape)

    def weight_score(self, module, w, grads, inputs):
        return kernels.linear_weight_score(w.t(), grads, inputs).t().contiguous()

    def weight_product(self, module, w, grads, inputs):
        return super().weight_product(module, w.t(), grads, inputs).t().contiguous()


register_module_lazy("transformers.pytorch_utils", "Conv1D")(HFConv1DRule())


class EmbeddingRule:
    """nn.Embedding, target or not: ``Y = W[idx]``, a Linear of the one-hot input, so linear
    in W with no input stream (idx carries none). Target: ``T_Y = δW[idx] = Y`` (SPEC §3,
    δθ = θ), except at positions reading ``padding_idx``: the lookup of that row is a
    constant (torch's embedding backward gives the row no gradient from it; the reference path
    runs the lookup the same way, :func:`oba_ext.reference.decompose.embedding_lookup`), so
    T_Y = 0 there; non-target: no tangent. Backward returns nothing (idx has no cotangent).
    The row is still a parameter; capture refuses the weight shared with another layer (an LM
    head), where it would move, so here nothing else reads it and its scores are 0.

    Scores (SPEC §5 with X one-hot, T = 0, ``C_X − G_X = W C``), positions at ``padding_idx``
    left out (the constant lookup passes no gradient to the row):
        out_d  = Σ [C⊙Y]_d (T_Y − Y = 0)       first: Σ [G⊙Y]_d            (D,)
        in_v   = Σ_{idx = v} ⟨Y, C⟩            first: Σ_{idx = v} ⟨Y, G⟩    (V,)
        weight = W ⊙ Σ_{idx = v} C  (scatter)  first: W ⊙ Σ_{idx = v} G     (V, D)
    ``max_norm`` (renormalizes W in place) and ``scale_grad_by_freq`` (a rescaled gradient that
    is not the loss's derivative) are refused at capture; the reference path refuses them too
    (:func:`oba_ext.reference.refuse_self_modifying`). ``sparse=True`` changes nothing here."""

    def capture_check(self, node, module):
        from ...errors import RefusedError
        from ...reference.decompose import refuse_embedding_flags  # one wording on both paths
        try:
            refuse_embedding_flags(node.target, module.max_norm, module.scale_grad_by_freq)
        except RefusedError as e:
            return e
        return None

    def forward(self, call, ctx):
        m, idx = call.module, call.inputs[0]
        y = F.embedding(idx, m.weight, m.padding_idx)
        target = ctx.layer is not None
        direction = getattr(ctx, "direction", None) if target else None
        if direction is not None:  # δW = V (curvature products, README "Curvature products")
            V = direction.get("weight")
            d = None if V is None else F.embedding(idx, V)
            ctx.module, ctx.idx, ctx.y = m, idx, d  # y: the moved rows V[idx] (scores along V)
            return y, (None if d is None else self._keep(m, idx, d))
        if not (target and ctx.tangents):
            t_y = None
        else:
            t_y = self._keep(m, idx, y)
        if target:
            ctx.module, ctx.idx, ctx.y = m, idx, y
        return y, t_y

    @staticmethod
    def _keep(m, idx, t):
        """``t`` with the positions reading ``padding_idx`` zeroed (a constant lookup)."""
        return t if m.padding_idx is None else t * (idx != m.padding_idx).unsqueeze(-1)

    def backward(self, ctx, g, c):
        if ctx.layer is None:
            return [None]
        if getattr(ctx, "direction", None) is not None:
            return self._backward_direction(ctx, g, c)
        m, y = ctx.module, ctx.y
        streams = [("taylor", g)] if (ctx.mode is None or ctx.first) else []
        if ctx.mode is not None:
            streams.append((ctx.mode, c))
        for q, s in streams:
            self._record_keys(ctx, q, s, y, m.weight)
        return [None]

    def _record_keys(self, ctx, q, s, y, scale):
        """Record ``q``'s requested keys for the backward stream ``s`` (None: zero) against the
        moved rows ``y`` (None: zero) of this lookup, the weight score scaled by ``scale``:
            out = Σ [s⊙y]_d,  in_v = Σ_{idx = v} ⟨y, s⟩,  weight = scale ⊙ Σ_{idx = v} s
        with ``y = W[idx]``, ``scale = W`` for δθ = θ and ``y = V[idx]``, ``scale = V`` along a
        direction; positions reading ``padding_idx`` are left out (a constant lookup)."""
        m, idx, keys = ctx.module, ctx.idx, ctx.keys
        w = m.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        if s is None or y is None:
            zeros = {"out": (w.shape[1],), "in": (w.shape[0],), "weight": tuple(w.shape)}
            for k in keys:
                ctx.record(q, k, torch.zeros(zeros[k], dtype=acc, device=w.device))
            return
        s = self._keep(m, idx, s)
        flat_idx = idx.reshape(-1)
        if "out" in keys:
            ctx.record(q, "out", (s * y).reshape(-1, y.shape[-1]).sum(0, dtype=acc))
        if "in" in keys:
            per_pos = (s * y).sum(-1, dtype=acc).reshape(-1)
            ctx.record(q, "in", torch.zeros(w.shape[0], dtype=acc, device=w.device)
                       .index_add_(0, flat_idx, per_pos))
        if "weight" in keys:
            rows = torch.zeros(w.shape, dtype=s.dtype, device=w.device).index_add_(
                0, flat_idx, s.reshape(-1, w.shape[1]))
            ctx.record(q, "weight", scale * rows)

    def _backward_direction(self, ctx, g, c):
        """Along ``δW = V``: no input stream (T_X = 0), so ``(Mv)_W = Σ_{idx = v} C`` (the GGN:
        the one backward stream, passed as ``g``); scores ``v_i (Mv)_i`` per key as above with
        ``Y`` replaced by the moved rows ``V[idx]`` (``ctx.y``; None when V = 0)."""
        m, idx = ctx.module, ctx.idx
        w = m.weight
        s = g if ctx.mode is None else c
        if ctx.product:
            acc = torch.float64 if w.dtype == torch.float64 else torch.float32
            rows = torch.zeros(w.shape, dtype=acc, device=w.device)
            if s is not None:
                rows.index_add_(0, idx.reshape(-1),
                                self._keep(m, idx, s).reshape(-1, w.shape[1]).to(acc))
            ctx.record("hvp", "weight", rows)
            return [None]
        self._record_keys(ctx, ctx.mode, s, ctx.y, ctx.direction.get("weight"))
        return [None]


register_module(nn.Embedding)(EmbeddingRule())

_EMBEDDING_ARGS = ("input", "weight", "padding_idx", "max_norm", "norm_type",
                   "scale_grad_by_freq", "sparse")


def _embedding_args(args, kwargs) -> dict:
    a = dict(zip(_EMBEDDING_ARGS, args))
    a.update(kwargs)
    return a


class FunctionalEmbeddingRule:
    """``F.embedding(idx, W, ...)`` called as a function (W not a target: the engine refuses a
    target parameter used outside its module): the generic rule (linear in W, exact for every
    kind), with the tangent zeroed at positions reading ``padding_idx`` — the lookup of that row
    is a constant, as in torch's embedding backward and on the reference path
    (:func:`oba_ext.reference.decompose.embedding_lookup`); torch's forward-mode AD alone would
    move it. ``max_norm`` (renormalizes W in place during forward) and
    ``scale_grad_by_freq=True`` (a gradient that is not the loss's derivative) are refused by
    name at capture (``impl="auto"`` then falls back to the reference path, which refuses them
    too) and at run time."""

    @staticmethod
    def _reason(a) -> Optional[str]:
        from ...errors import RefusedError
        from ...reference.decompose import refuse_embedding_flags  # one wording on both paths
        try:
            refuse_embedding_flags(None, a.get("max_norm"), a.get("scale_grad_by_freq", False))
        except RefusedError as e:
            return str(e)
        return None

    def capture_check(self, node, module):
        from ...errors import RefusedError
        reason = self._reason(_embedding_args(node.args, node.kwargs))
        return None if reason is None else RefusedError(f"node {node.name!r}: {reason}")

    def forward(self, call, ctx):
        from ...errors import RefusedError
        a = _embedding_args(call.args, call.kwargs)
        reason = self._reason(a)
        if reason is not None:
            raise RefusedError(f"{call.node.name}: {reason}")
        y, t_y = GENERIC_QUIET.forward(call, ctx)
        pad = a.get("padding_idx")
        if t_y is not None and pad is not None:
            idx = a["input"]
            pad = pad + a["weight"].shape[0] if pad < 0 else pad
            t_y = t_y * (idx != pad).unsqueeze(-1)
        return y, t_y

    def backward(self, ctx, g, c):
        return GENERIC_QUIET.backward(ctx, g, c)


register_function(F.embedding)(FunctionalEmbeddingRule())
