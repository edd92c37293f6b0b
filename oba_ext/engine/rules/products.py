"""Ops with products hidden inside (SPEC §8): GLU, ``addcmul``/``addcdiv``, ``outer``/
``tensordot``/``inner``/``dot``/``mv``, einsum of three or more operands, ``F.bilinear``/
``nn.Bilinear``, ``addmm``/``baddbmm``/``addbmm``/``addmv``/``addr``, ``prod``/``cumprod``/
``multi_dot``, ``nn.EmbeddingBag``/``F.embedding_bag`` (``per_sample_weights`` times the looked-up
rows), and the recurrent layers ``nn.LSTM``/``GRU``/``RNN`` with their cells.
(``det``, ``kron``, ``cross``, ``inv``, ``solve``, … have no rule: the generic rule computes
them for ``taylor``/``exact`` and an ``oba`` run refuses them by name, on both paths.)

Two-operand products (``outer``, ``tensordot``, ``inner``, ``dot``, ``mv``) use the product rule
of :class:`.arith.BilinearRule`. Every other op here is evaluated through its written-out form
(:mod:`oba_ext.reference.decompose`, the same functions the reference oracles run) by
:class:`DecomposedRule`, which applies SPEC §7.2's Φ construction to the op alone:

    forward:  (y, T_y) by forward-mode AD of the written-out op, recording for every product
              node b inside it the operand tangents u̇_b, ẇ_b
    backward: G_x = J_xᵀ G
              C_x = J_xᵀ C + ∇_x Σ_b ⟨g_b, B_b(u_b(x), ẇ_b) + B_b(u̇_b, w_b(x))⟩   (oba)
              C_x = J_xᵀ C + ∇_x ⟨J_xᵀ G, T_x⟩                                   (exact)

with ``g_b = ∂⟨G, y⟩/∂O_b``. This is exactly what the sweep computes for the op written out
(the product rule at each product node, every other op linearized), so ``F.glu(z)`` scores
the same as ``a * torch.sigmoid(b)`` and ``nn.LSTM`` the same as the LSTM written with explicit
gate products. Parameters of these modules (LSTM weights, ``nn.Bilinear.weight``) are not
target parameters: they are constants of the sweep. Random draws inside (LSTM dropout between
layers in train mode) are replayed in backward from the RNG state of the forward.

The rule costs a few autograd passes over the op (it is not fused): correct first.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as fwAD
from torch.utils import _pytree as pytree

from . import register_function, register_method, register_module
from .arith import BilinearRule
from .autodiff import is_float, op_of, streamed_inputs, unpack_duals


class _Rng:
    """The RNG state at the op's forward, replayed for its backward re-evaluation."""

    def __init__(self, inputs):
        dev = next((x.device for x in inputs if isinstance(x, torch.Tensor)), None)
        self.cuda = dev is not None and dev.type == "cuda"
        self.device = dev
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(dev) if self.cuda else None

    def replay(self):
        rng = torch.random.fork_rng(devices=[self.device] if self.cuda else [])

        class _Ctx:
            def __enter__(s):
                rng.__enter__()
                torch.set_rng_state(self.cpu_state)
                if self.cuda:
                    torch.cuda.set_rng_state(self.cuda_state, self.device)

            def __exit__(s, *exc):
                return rng.__exit__(*exc)
        return _Ctx()


class DecomposedRule:
    """Any op (module, function or method) the reference recorder writes out
    (:data:`oba_ext.reference.decompose.DECOMPOSITIONS`); see the module docstring."""

    def forward(self, call, ctx):
        from ...reference.oracles import BilinearRecorder

        active = streamed_inputs(call)
        f = op_of(call, active)
        primals = tuple(call.inputs[i] for i in active)
        tangents = [call.tangents[i] for i in active]
        ctx.f, ctx.active, ctx.primals, ctx.n_inputs = f, active, primals, len(call.inputs)
        ctx.rng = _Rng(call.inputs)
        ctx.tnodes = None
        ctx.tans = None
        if any(t is not None for t in tangents):
            tans = tuple(torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents))
            rec = BilinearRecorder(record=True, tangents=True)
            with fwAD.dual_level():
                duals = [fwAD.make_dual(p, t) for p, t in zip(primals, tans)]
                with rec:
                    out = f(*duals)
                leaves, spec = pytree.tree_flatten(out)
                ys, ts = unpack_duals(leaves)
            y = pytree.tree_unflatten(ys, spec)
            t_y = ts[0] if isinstance(y, torch.Tensor) else pytree.tree_unflatten(ts, spec)
            ctx.tnodes = rec.nodes
            ctx.tans = tans
        else:
            with BilinearRecorder(record=False):
                y = f(*primals)
            t_y = None
        leaves, spec = pytree.tree_flatten(y)
        ctx.out_spec, ctx.float_pos = spec, [k for k, v in enumerate(leaves) if is_float(v)]
        ctx.n_out = len(leaves)
        return y, t_y

    def _cots(self, ctx, v):
        from .generic import _flatten_cot
        if v is None:
            return [None] * ctx.n_out
        if ctx.n_out == 1 and not isinstance(v, (list, tuple)):
            return [v]
        return _flatten_cot(v, ctx.out_spec)

    def backward(self, ctx, g, c):
        from ...reference.oracles import BilinearRecorder, _phi_terms

        out = [None] * ctx.n_inputs
        if not ctx.primals:
            return out
        mode = ctx.mode
        record = mode == "oba" and ctx.tnodes is not None
        gl, cl = self._cots(ctx, g), self._cots(ctx, c)
        with torch.enable_grad(), ctx.rng.replay():
            xs = [p.detach().requires_grad_(True) for p in ctx.primals]
            rec = BilinearRecorder(record=record)
            with rec:
                y = ctx.f(*xs)
            ys = pytree.tree_flatten(y)[0]
            first = sum((ys[k] * gl[k]).sum() for k in ctx.float_pos if gl[k] is not None)
            nodes = []
            if record:
                if (len(rec.nodes) != len(ctx.tnodes)
                        or any(a.func is not b.func for a, b in zip(rec.nodes, ctx.tnodes))):
                    raise RuntimeError(f"{ctx.name}: the op took different paths in its forward "
                                       f"and backward evaluations")
                nodes = [(n, t) for n, t in zip(rec.nodes, ctx.tnodes) if n.out.requires_grad]
            if not isinstance(first, torch.Tensor) or not first.requires_grad:
                return out
            want_c = mode is not None
            grads = torch.autograd.grad(first, xs + [n.out for n, _ in nodes],
                                        retain_graph=want_c, create_graph=bool(ctx.exact),
                                        allow_unused=True)
            gx, gbs = grads[:len(xs)], grads[len(xs):]
            cx = [None] * len(xs)
            if want_c:
                second = None

                def add(v):
                    nonlocal second
                    second = v if second is None else second + v
                for k in ctx.float_pos:
                    if cl[k] is not None:
                        add((ys[k] * cl[k]).sum())
                for (node, t), gb in zip(nodes, gbs):  # oba: the product nodes' Φ terms
                    if gb is None:
                        continue
                    for term in _phi_terms(node, t):
                        add((gb.detach() * term).sum())
                if ctx.exact and ctx.tans is not None:  # exact: the op's full curvature
                    for gi, ti in zip(gx, ctx.tans):
                        if gi is not None and gi.requires_grad:
                            add((gi * ti).sum())
                if isinstance(second, torch.Tensor) and second.requires_grad:
                    cx = list(torch.autograd.grad(second, xs, allow_unused=True))
        for k, i in enumerate(ctx.active):
            gi = gx[k].detach() if gx[k] is not None else torch.zeros_like(ctx.primals[k])
            ci = cx[k].detach() if cx[k] is not None else None
            if mode is not None and ci is None:
                ci = torch.zeros_like(ctx.primals[k])
            out[i] = (gi, ci)
        return out


DECOMPOSED = DecomposedRule()

# GLU: F.glu(z, dim) ≡ a * sigmoid(b)
register_module(nn.GLU)(DECOMPOSED)
register_function(F.glu)(DECOMPOSED)
# addcmul / addcdiv, function and method forms
register_function(torch.addcmul, torch.addcdiv)(DECOMPOSED)
register_method("addcmul", "addcdiv")(DECOMPOSED)
# bilinear layers, the addmm family, einsum of any number of operands
register_module(nn.Bilinear)(DECOMPOSED)
register_function(F.bilinear, torch.addmm, torch.baddbmm, torch.addbmm, torch.addmv,
                  torch.addr)(DECOMPOSED)
register_method("addmm", "baddbmm", "addbmm", "addmv", "addr")(DECOMPOSED)
# embedding bags: the per-sample weights multiply the looked-up rows (and torch's fused bag has
# no forward-mode AD at all)
register_module(nn.EmbeddingBag)(DECOMPOSED)
register_function(F.embedding_bag)(DECOMPOSED)
# recurrent layers and cells (their gates multiply θ-dependent activations)
register_module(nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell)(DECOMPOSED)
# products of many factors
register_function(torch.prod, torch.cumprod, torch.linalg.multi_dot, torch.chain_matmul)(DECOMPOSED)
register_method("prod", "cumprod")(DECOMPOSED)
# two-operand products: the product rule directly
_BIL = BilinearRule()
register_function(torch.outer, torch.ger, torch.tensordot, torch.inner, torch.dot,
                  torch.mv)(_BIL)
register_method("outer", "ger", "inner", "dot", "mv")(_BIL)
