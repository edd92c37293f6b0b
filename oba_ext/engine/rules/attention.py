"""Attention rules (SPEC §4): ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention``.

Passes with tangents run the fused two-stream kernels through :mod:`oba_ext.engine.kernels`
(``attention_two_stream_forward`` → ``(O, Ȯ, lse)``, ``attention_second_order_backward`` →
``(G_Q, G_K, G_V, C_Q, C_K, C_V)``; ``exact`` adds the softmax curvature). The two products
``QKᵀ`` and ``AV`` carry their product-rule terms in both modes.

``scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0, is_causal, scale)``: any
leading dims (flattened to (B, 1, N, D) unless 4-D), bool/additive masks, causal,
``enable_gqa`` (the kernels index key/value head h // (H / H_kv); K/V are not repeated).
First-order passes (``taylor``, ``jacobian``: no tangents) call ``F.scaled_dot_product_attention``
itself and its autograd backward instead of the two-stream kernels. Refused: ``dropout_p > 0``
(score in eval mode), a θ-dependent mask.

``nn.MultiheadAttention`` (a target layer of kind "mha"): the q/k/v projections are the packed
``in_proj_weight`` rows (or ``q/k/v_proj_weight``), each run through the Linear rule as a
virtual layer; their scores are assembled into the keys of the reference path
(``oba_ext.reference.structured._mha``): ``out`` (3E,) = q|k|v rows with
``parts.{q,k,v}.out``; ``parts.{q,k,v}.in`` and, when packed, ``in`` = their sum; ``weight``
(packed) or ``parts.{q,k,v}.weight``; ``bias`` (3E,). ``out_proj`` is its own Linear target
(``<name>.out_proj``), scored by the Linear rule inside this one. Masks: ``attn_mask`` (bool
True = *not* allowed, or additive; (L, S) or (N·H, L, S)), ``key_padding_mask`` (N, S), the
``is_causal`` hint read as torch reads it (refused without a mask; the causal mask in place of
``attn_mask`` when there is no ``key_padding_mask`` and no ``need_weights``; else ignored).
``need_weights=True`` returns the head-averaged
(or per-head) weights, which must not feed anything scored (their tangent is not formed).
Refused: ``bias_k``/``bias_v``, ``add_zero_attn``, dropout in train mode.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import RefusedError
from .. import kernels
from . import register_function, register_module
from .linear import LinearRule
from .pairs import as_pair, halves, new_pair

_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None,
                  "enable_gqa": False}
_LINEAR = LinearRule()


def _bind_sdpa(args, kwargs, where):
    if len(args) > len(_SDPA_PARAMS):
        raise ValueError(f"{where}: scaled_dot_product_attention takes at most "
                         f"{len(_SDPA_PARAMS)} arguments, got {len(args)}")
    bound = dict(_SDPA_DEFAULTS)
    bound.update(zip(_SDPA_PARAMS, args))
    for k, v in kwargs.items():
        if k not in _SDPA_PARAMS:
            raise ValueError(f"{where}: unknown scaled_dot_product_attention argument {k!r}")
        bound[k] = v
    return bound


def _four_d(x, keep_heads=False):
    """(..., N, D) -> (B, H, N, D): 4-D as is, else leading dims flattened into B (H = 1), or
    with ``keep_heads`` (grouped-query attention) into B with dim −3 kept as H."""
    if x is None or x.dim() == 4:
        return x
    if keep_heads:
        return x.reshape(-1, *x.shape[-3:])
    return x.reshape(-1, 1, x.shape[-2], x.shape[-1])


def _sdpa_mask(mask, is_causal, L, S):
    """(mask, is_causal) as SDPA accepts them: it refuses a mask together with is_causal, so
    the causal part (key j visible to query i iff j <= i) is folded into the mask then."""
    if mask is None or not is_causal:
        return mask, is_causal
    keep = torch.ones(L, S, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return mask & keep, False
    return mask.masked_fill(~keep, float("-inf")), False


class _AttentionCore:
    """Forward/backward of attention on 4-D (B, H, N, D) q and (B, H_kv, N, D) k/v
    (H_kv | H: grouped-query attention by head index), saved on ``st``.

    Passes with tangents (``oba``/``exact``) run the fused two-stream kernels. First-order
    passes (``taylor``/``jacobian``: no tangents, no second stream) run PyTorch's own
    ``F.scaled_dot_product_attention`` and its autograd backward: the same numbers as a
    gradient of the model, on whatever fused SDPA kernel PyTorch picks."""

    @staticmethod
    def forward(st, q, k, v, tq, tk, tv, mask, is_causal, scale, first_order=False,
                needs=(True, True, True)):
        st.first_order = first_order
        st.q, st.k, st.v = q, k, v
        st.mask, st.is_causal, st.scale = mask, is_causal, scale
        if first_order:
            m, causal = _sdpa_mask(mask, is_causal, q.shape[-2], k.shape[-2])
            with torch.enable_grad():
                ins = [x.detach().requires_grad_(bool(n)) for x, n in zip((q, k, v), needs)]
                O = F.scaled_dot_product_attention(*ins, attn_mask=m, is_causal=causal,
                                                   scale=scale,
                                                   enable_gqa=q.shape[1] != k.shape[1])
            st.sdpa = (O, ins)
            return O.detach(), None
        O, Od, lse = kernels.attention_two_stream_forward(q, k, v, tq, tk, tv, mask, is_causal,
                                                          scale)
        st.tq, st.tk, st.tv, st.lse = tq, tk, tv, lse
        has_t = tq is not None or tk is not None or tv is not None
        return O, (Od if has_t else None)

    @staticmethod
    def backward(st, ctx, go, co):
        if st.first_order:
            O, ins = st.sdpa
            want = [x for x in ins if x.requires_grad]
            grads = iter(torch.autograd.grad(O, want, go)) if want else iter(())
            return tuple((next(grads), None) if x.requires_grad else (None, None) for x in ins)
        second = ctx.mode is not None
        tq, tk, tv = (st.tq, st.tk, st.tv) if second else (None, None, None)
        out = kernels.attention_second_order_backward(
            st.q, st.k, st.v, tq, tk, tv, go, co if second else None, st.mask, st.is_causal,
            st.scale, st.lse, bool(ctx.exact))
        gq, gk, gv, cq, ck, cv = out
        if not second:
            cq = ck = cv = None
        return (gq, cq), (gk, ck), (gv, cv)


class SDPARule:
    """``F.scaled_dot_product_attention`` on the fused kernels (module docstring)."""

    def forward(self, call, ctx):
        where = ctx.name
        slots_args, slots_kwargs = call.rebuild(list(range(len(call.inputs))))
        slot = _bind_sdpa(slots_args, slots_kwargs, where)
        b = _bind_sdpa(call.args, call.kwargs, where)
        if b["dropout_p"]:
            raise RefusedError(f"node {where!r} (scaled_dot_product_attention): dropout_p="
                               f"{b['dropout_p']}; attention dropout must be off (score in eval "
                               f"mode)")
        q, k, v = b["query"], b["key"], b["value"]
        t = [call.tangents[slot[n]] for n in ("query", "key", "value")]
        gqa = bool(b["enable_gqa"]) and q.dim() >= 3 and q.shape[-3] != k.shape[-3]
        if gqa and (k.shape[-3] == 0 or q.shape[-3] % k.shape[-3]
                    or v.shape[-3] != k.shape[-3]):
            raise ValueError(f"node {where!r}: enable_gqa needs the query heads "
                             f"({q.shape[-3]}) to be a multiple of the key/value heads "
                             f"({k.shape[-3]}, {v.shape[-3]})")
        mask = b["attn_mask"]
        ms = slot["attn_mask"]
        if isinstance(ms, int) and (call.tangents[ms] is not None or call.needs[ms]):
            raise ValueError(f"{where}: the attention mask depends on the scored parameters; "
                             f"the engine supports constant masks only")
        lead, L, S = q.shape[:-2], q.shape[-2], k.shape[-2]
        if mask is not None and q.dim() != 4:
            mask = mask.expand(*lead, L, S)
            mask = mask.reshape(-1, lead[-1], L, S) if gqa else mask.reshape(-1, 1, L, S)
        slots = (slot["query"], slot["key"], slot["value"])
        st = SimpleNamespace(shapes=(q.shape, k.shape, v.shape), slots=slots, n=len(call.inputs))
        O, Od = _AttentionCore.forward(
            st, _four_d(q, gqa), _four_d(k, gqa), _four_d(v, gqa), _four_d(t[0], gqa),
            _four_d(t[1], gqa), _four_d(t[2], gqa), mask, bool(b["is_causal"]), b["scale"],
            first_order=not ctx.tangents, needs=[call.needs[i] for i in slots])
        out_shape = (*lead, L, v.shape[-1])
        ctx.attn = st
        return O.reshape(out_shape), (Od.reshape(out_shape) if Od is not None else None)

    def backward(self, ctx, g, c):
        st = ctx.attn
        gqa = len(st.shapes[0]) != 4 and st.shapes[0][-3] != st.shapes[1][-3]
        res = _AttentionCore.backward(st, ctx, _four_d(g, gqa), _four_d(c, gqa))
        out = [None] * st.n
        for slot, shape, (gi, ci) in zip(st.slots, st.shapes, res):
            if ctx.needs[slot]:
                out[slot] = (gi.reshape(shape) if gi is not None else None,
                             ci.reshape(shape) if ci is not None else None)
        return out


# ------------------------------------------------------------------ nn.MultiheadAttention
class _SubCtx:
    """The ctx of a Linear rule run inside the MHA rule (a virtual or a child Linear layer)."""

    def __init__(self, name, layer, keys, tangents, need_input, record):
        self.name, self.layer, self.keys, self.tangents = name, layer, keys, tangents
        self.needs = [need_input]
        self.record = record
        self.mode, self.exact, self.first = None, False, False

    def sync(self, ctx):
        self.mode, self.exact, self.first = ctx.mode, ctx.exact, ctx.first


class _Collect:
    """Collects a virtual layer's scores: {quantity: {key: tensor}}."""

    def __init__(self):
        self.d = {}

    def __call__(self, q, key, v):
        dq = self.d.setdefault(q, {})
        dq[key] = dq[key] + v if key in dq else v


def _mha_masks(m, attn_mask, kpm, N, H, L, S, is_causal, need_weights, dtype, where):
    """MHA's attn_mask / key_padding_mask / is_causal as one SDPA-style mask (bool True = attend,
    or additive), broadcastable to (N, H, L, S); or (None, causal flag). ``is_causal`` is read
    as torch reads it (:func:`oba_ext.reference.decompose.mha_causal_replaces_mask`: refused
    without attn_mask; the causal mask instead of attn_mask without key_padding_mask and
    need_weights; else ignored)."""
    from ...reference.decompose import mha_causal_replaces_mask  # one rule, both paths
    if mha_causal_replaces_mask(attn_mask, kpm, bool(need_weights), bool(is_causal),
                                f"module {where!r} (MultiheadAttention)"):
        return None, True
    add = None

    def as_add(mk, shape):
        if mk.dtype == torch.bool:
            return torch.zeros(mk.shape, dtype=dtype, device=mk.device).masked_fill(
                mk, float("-inf")).reshape(shape)
        if not mk.is_floating_point():
            raise ValueError(f"{where}: masks must be bool or float, got {mk.dtype}")
        return mk.to(dtype).reshape(shape)

    if attn_mask is not None:
        if attn_mask.dim() == 2:
            add = as_add(attn_mask, (1, 1, L, S))
        elif attn_mask.dim() == 3:
            add = as_add(attn_mask, (N, H, L, S))
        else:
            raise ValueError(f"{where}: attn_mask must be (L, S) or (N·num_heads, L, S), got "
                             f"{tuple(attn_mask.shape)}")
    if kpm is not None:
        k = as_add(kpm, (N, 1, 1, S))
        add = k if add is None else add + k
    return add, False


_MHA_PARAMS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
               "average_attn_weights", "is_causal")
_MHA_DEFAULTS = {"key_padding_mask": None, "need_weights": True, "attn_mask": None,
                 "average_attn_weights": True, "is_causal": False}


class MHARule:
    """``nn.MultiheadAttention`` (module docstring)."""

    def _check(self, m, where):
        if m.bias_k is not None or m.bias_v is not None:
            raise RefusedError(f"{where}: nn.MultiheadAttention with add_bias_kv is not "
                               f"supported")
        if m.add_zero_attn:
            raise RefusedError(f"{where}: nn.MultiheadAttention with add_zero_attn is not "
                               f"supported")
        if m.training and m.dropout > 0:
            raise RefusedError(f"{where}: nn.MultiheadAttention dropout={m.dropout} in train "
                               f"mode; score in eval mode (model.eval())")

    def forward(self, call, ctx):
        m = call.module
        name = call.node.target
        self._check(m, name)
        slots_args, slots_kwargs = call.rebuild(list(range(len(call.inputs))))
        slot = dict(_MHA_DEFAULTS, **dict(zip(_MHA_PARAMS, slots_args)), **slots_kwargs)
        b = dict(_MHA_DEFAULTS, **dict(zip(_MHA_PARAMS, call.args)), **call.kwargs)
        for mk in ("attn_mask", "key_padding_mask"):
            s = slot[mk]
            if isinstance(s, int) and (call.tangents[s] is not None or call.needs[s]):
                raise ValueError(f"{name}: {mk} depends on the scored parameters")
        x = {r: b[r] for r in ("query", "key", "value")}
        tx = {r: call.tangents[slot[r]] for r in x}
        batched = x["query"].dim() == 3
        # tokens stay in the caller's layout (the projections and scores do not care):
        # (N, L, E) when batch_first, else (L, N, E); unbatched (L, E) -> (L, 1, E)
        bf = batched and bool(m.batch_first)
        if not batched:
            x = {r: v.unsqueeze(1) for r, v in x.items()}
            tx = {r: (t.unsqueeze(1) if t is not None else None) for r, t in tx.items()}
        if bf:
            N, L, E = x["query"].shape
            S = x["key"].shape[1]
        else:
            L, N, E = x["query"].shape
            S = x["key"].shape[0]
        H = m.num_heads
        hd = E // H
        # self-attention: stack [X; T] once for the three projections (they reuse its halves)
        stacked = {}
        for r in x:
            if tx[r] is not None and as_pair(x[r], tx[r]) is None:
                key = (id(x[r]), id(tx[r]))
                if key not in stacked:
                    stacked[key] = halves(torch.cat([x[r], tx[r]], 0))
                x[r], tx[r] = stacked[key]
        target = ctx.layer is not None
        tangents = ctx.tangents
        # virtual q/k/v Linear layers over the packed rows or the separate weights
        bias = m.in_proj_bias
        bq = bk = bv = None
        if bias is not None:
            bq, bk, bv = bias.chunk(3)
        packed = bool(m._qkv_same_embed_dim)  # packed in_proj_weight, else q/k/v_proj_weight
        ws = (m.in_proj_weight.chunk(3) if packed
              else (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))
        subs, proj, tproj = {}, {}, {}
        dirs = self._qkv_directions(ctx, packed) if target else None
        for r, w, bb in zip(("query", "key", "value"), ws, (bq, bk, bv)):
            sub = _SubCtx(f"{name}[{r[0]}]", name if target else None, ctx.keys, tangents,
                          call.needs[slot[r]], _Collect())
            if dirs is not None:
                sub.direction, sub.product = dirs[r], ctx.product
            fake = SimpleNamespace(weight=w, bias=bb)
            y, ty = _LINEAR.forward(SimpleNamespace(module=fake, inputs=[x[r]], tangents=[tx[r]]),
                                    sub)
            sub.fake = fake
            subs[r], proj[r], tproj[r] = sub, y, ty

        def heads(t, n):  # tokens (N, n, E) or (n, N, E) -> (N, H, n, hd)
            if t is None:
                return None
            if bf:
                return t.reshape(N, n, H, hd).permute(0, 2, 1, 3)
            return t.reshape(n, N, H, hd).permute(1, 2, 0, 3)

        mask, causal = _mha_masks(m, b["attn_mask"], b["key_padding_mask"], N, H, L, S,
                                  b["is_causal"], b["need_weights"], proj["query"].dtype, name)
        st = SimpleNamespace()
        O, Od = _AttentionCore.forward(st, heads(proj["query"], L), heads(proj["key"], S),
                                       heads(proj["value"], S), heads(tproj["query"], L),
                                       heads(tproj["key"], S), heads(tproj["value"], S), mask,
                                       causal, 1.0 / math.sqrt(hd),
                                       first_order=not ctx.tangents)

        tok = (N, L, E) if bf else (L, N, E)

        def as_tokens(t):  # (N, H, L, hd) -> tokens (view)
            return t.permute(0, 2, 1, 3) if bf else t.permute(2, 0, 1, 3)

        if Od is not None:  # O and Ȯ written into the halves of one buffer: out_proj stacks free
            o_in, od_in = halves(new_pair(O.new_empty(tok)))
            o_in.view(*tok[:2], H, hd).copy_(as_tokens(O))
            od_in.view(*tok[:2], H, hd).copy_(as_tokens(Od))
        else:
            o_in, od_in = as_tokens(O).reshape(tok), None

        out_name = f"{name}.out_proj"
        rec = ctx.sublayer(out_name)
        osub = _SubCtx(out_name, out_name if rec is not None else None,
                       rec[1] if rec is not None else (), tangents, True,
                       rec[0] if rec is not None else None)
        if rec is not None and rec[2] is not None:  # a sweep along a direction
            osub.direction, osub.product = rec[2], getattr(ctx, "product", False)
        out, tout = _LINEAR.forward(SimpleNamespace(module=m.out_proj, inputs=[o_in],
                                                    tangents=[od_in]), osub)
        weights = None
        if b["need_weights"]:
            weights = self._weights(st, b["average_attn_weights"])
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(1)
            tout = tout.squeeze(1) if tout is not None else None
        ctx.mha = SimpleNamespace(st=st, subs=subs, osub=osub, slot=slot, n=len(call.inputs),
                                  shape=(L, N, E, S, H, hd), batched=batched,
                                  bf=bf, packed=packed, target=target,
                                  in_shapes={r: b[r].shape for r in ("query", "key", "value")})
        return (out, weights), ([tout, None] if tout is not None else None)

    @staticmethod
    def _qkv_directions(ctx, packed):
        """{"query"|"key"|"value": {"weight": V, "bias": v_b}} of the in-projection in a sweep
        along a direction (``ctx.direction``: {local parameter name: tensor or None}), or
        None."""
        d = getattr(ctx, "direction", None)
        if d is None:
            return None
        vb = d.get("in_proj_bias")
        vbs = vb.chunk(3) if vb is not None else (None, None, None)
        if packed:
            V = d.get("in_proj_weight")
            Vs = V.chunk(3) if V is not None else (None, None, None)
        else:
            Vs = tuple(d.get(f"{r}_proj_weight") for r in "qkv")
        return {r: {"weight": V, "bias": vb}
                for r, V, vb in zip(("query", "key", "value"), Vs, vbs)}

    @staticmethod
    def _weights(st, average):
        """Attention weights A = exp(S − lse) (N, H, L, S), averaged over heads if asked."""
        S = torch.matmul(st.q, st.k.transpose(-1, -2)) * st.scale
        if st.mask is not None:
            S = S + st.mask
        if st.is_causal:
            keep = torch.ones(S.shape[-2:], dtype=torch.bool, device=S.device).tril()
            S = S.masked_fill(~keep, float("-inf"))
        A = torch.softmax(S, dim=-1)
        return A.mean(dim=1) if average else A

    def backward(self, ctx, g, c):
        s = ctx.mha
        L, N, E, S, H, hd = s.shape
        g_out, g_w = (g[0], g[1]) if isinstance(g, (list, tuple)) else (g, None)
        c_out = c[0] if isinstance(c, (list, tuple)) else c
        if g_w is not None:
            from ..capture import CaptureError  # noqa: PLC0415 (capture imports the rules)
            raise CaptureError(f"{ctx.name}: the attention weights returned by "
                             f"nn.MultiheadAttention feed the loss; the engine supports "
                             f"need_weights outputs that are not used downstream only")

        def tokens(t):
            if t is None:
                return None
            return t.unsqueeze(1) if not s.batched else t

        s.osub.sync(ctx)
        r = _LINEAR.backward(s.osub, tokens(g_out), tokens(c_out))[0]
        go, co = r

        bf = s.bf

        def heads(t, n):  # tokens -> (N, H, n, hd)
            if t is None:
                return None
            if bf:
                return t.reshape(N, n, H, hd).permute(0, 2, 1, 3)
            return t.reshape(n, N, H, hd).permute(1, 2, 0, 3)

        def merge(gi, ci, n):  # (N, H, n, hd) -> tokens; both streams paired in one buffer
            tok = (N, n, E) if bf else (n, N, E)
            perm = (0, 2, 1, 3) if bf else (2, 0, 1, 3)
            if gi is None:
                return None, None
            if ci is None:
                return gi.permute(*perm).reshape(tok), None
            a, b = halves(new_pair(gi.new_empty(tok)))
            a.view(*tok[:2], H, hd).copy_(gi.permute(*perm))
            b.view(*tok[:2], H, hd).copy_(ci.permute(*perm))
            return a, b

        res = _AttentionCore.backward(s.st, ctx, heads(go, L), heads(co, L))
        out = [None] * s.n
        for (role, n), (gi, ci) in zip((("query", L), ("key", S), ("value", S)), res):
            sub = s.subs[role]
            sub.sync(ctx)
            rr = _LINEAR.backward(sub, *merge(gi, ci, n))[0]
            slot = s.slot[role]
            if rr is not None and ctx.needs[slot]:
                gx, cx = rr
                if not s.batched:
                    gx, cx = gx.squeeze(1), (cx.squeeze(1) if cx is not None else None)
                out[slot] = (gx, cx)
        if s.target:
            self._record(ctx, s)
            for role in ("query", "key", "value"):  # recorded: the next pass (oba, then exact,
                s.subs[role].record.d.clear()       # in one call) must not record them again
        return out

    @staticmethod
    def _record(ctx, s):
        """Assemble the virtual layers' scores into the keys of the reference path."""
        parts = {r[0]: s.subs[r].record.d for r in ("query", "key", "value")}
        prod = {n: parts[n].get("hvp", {}) for n in "qkv"}
        if any(prod.values()):  # a curvature product (Mv) per parameter of the module
            for key, packed_name in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
                vals = [prod[n].get(key) for n in "qkv"]  # each virtual layer records both
                if vals[0] is None:  # no in_proj_bias
                    continue
                if s.packed or key == "bias":
                    ctx.record("hvp", packed_name, torch.cat(vals))
                else:
                    for n, v in zip("qkv", vals):
                        ctx.record("hvp", f"{n}_proj_weight", v)
            return
        for q in parts["q"]:
            p = {n: parts[n].get(q, {}) for n in "qkv"}
            for key in ("out", "in", "weight", "bias"):
                vals = [p[n].get(key) for n in "qkv"]
                if any(v is None for v in vals):
                    continue
                if key == "out":
                    ctx.record(q, "out", torch.cat(vals))
                    for n, v in zip("qkv", vals):
                        ctx.record(q, f"parts.{n}.out", v)
                elif key == "in":
                    for n, v in zip("qkv", vals):
                        ctx.record(q, f"parts.{n}.in", v)
                    if s.packed:
                        ctx.record(q, "in", vals[0] + vals[1] + vals[2])
                elif key == "weight":
                    if s.packed:
                        ctx.record(q, "weight", torch.cat(vals))
                    else:
                        for n, v in zip("qkv", vals):
                            ctx.record(q, f"parts.{n}.weight", v)
                else:
                    ctx.record(q, "bias", torch.cat(vals))


register_function(F.scaled_dot_product_attention)(SDPARule())
register_module(nn.MultiheadAttention)(MHARule())
