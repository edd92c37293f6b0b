"""Whole-model oracles (SPEC §7): exact pure-autograd reference quantities.

- :func:`exact_hvp`: ``Hθ`` by double backward, ``∇_θ (∇_θ L · sg(δθ))``.
- :func:`oba_hvp`: ``Ĥθ`` by the Φ-oracle. For every bilinear node ``O_b = B_b(u_b, w_b)``
  (:mod:`.bilinear`) record its operands and ``g_b = ∂L/∂O_b``; get the operands' tangents
  ``u̇_b, ẇ_b`` along ``δθ`` with forward-mode AD; then
  ``Φ(θ) = Σ_b ⟨g_b, B_b(u_b(θ), sg(ẇ_b)) + B_b(sg(u̇_b), w_b(θ))⟩`` and ``Ĥθ = ∇_θ Φ``.

Both evaluate the model functionally (``torch.func.functional_call``) on fresh leaves, so the
model's parameters, gradients and buffers are untouched, and replay the same RNG state in every
pass (so train-mode dropout draws one mask per batch; afterwards torch's global RNG stands
where one forward of the model would leave it). Attention and every other op that hides a
product (GLU, addcmul, nn.Bilinear, LSTM/GRU, …) are decomposed into explicit products
(:mod:`.decompose`) in every pass.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from .. import model_prep
from ..errors import RefusedError
from ..inputs import call_args
from .bilinear import BILINEAR, INPLACE_PRODUCTS
from .decompose import DECOMPOSITIONS, PRODUCT_REFUSALS, RANDOM_MASKS
from .functions import checked_double_backward, diagnose_forward_ad, opaque_functions


class _Node:
    __slots__ = ("func", "u", "w", "B", "out", "du", "dw")

    def __init__(self, func, u, w, B, out):
        self.func, self.u, self.w, self.B, self.out = func, u, w, B, out
        self.du = self.dw = None


class BilinearRecorder(TorchFunctionMode):
    """Records every bilinear call (operands, output, bilinear evaluator) in call order and
    decomposes attention. ``record=False`` only decomposes."""

    def __init__(self, record: bool = True, tangents: bool = False):
        super().__init__()
        self.record = record
        self.tangents = tangents
        self.nodes: List[_Node] = []
        self.opaque = 0  # > 0 inside a custom autograd.Function (one elementary op, SPEC §8)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.opaque:
            return func(*args, **kwargs)
        mask = RANDOM_MASKS.get(func)
        if mask is not None:
            # dropout: the mask is drawn on a plain tensor (forward-mode AD dual inputs make
            # F.dropout draw a different mask), then applied as a product with a constant
            m = mask(args, kwargs)
            if m is not None:
                with self:
                    return args[0] * m if args else kwargs["input"] * m
        dec = DECOMPOSITIONS.get(func)
        if dec is not None:
            with self:
                out = dec(*args, **kwargs)
            if out is not NotImplemented:
                return out
        if self.record:
            name = PRODUCT_REFUSALS.get(func)
            if name is not None and any(_theta_dependent(a) for a in
                                        list(args) + list(kwargs.values())):
                raise RefusedError(
                    f"oba_ext reference: {name} of θ-dependent values contains products the "
                    f"oba oracle does not write out (SPEC §8); it is not supported for oba "
                    f"(taylor and exact work)")
            if func in INPLACE_PRODUCTS and len(args) > 1 and isinstance(args[1], Tensor):
                raise RefusedError(
                    f"oba_ext reference: in-place product {getattr(func, '__name__', func)} of two "
                    "tensors cannot be recorded; use the out-of-place form (a * b)")
            split = BILINEAR.get(func)
            if split is not None:
                parts = split(args, kwargs)
                if parts is not None:
                    u, w, B = parts
                    out = func(*args, **kwargs)
                    # The model may overwrite operands or the output in place later
                    # (ReLU(inplace=True) right after a conv): keep frozen copies. The model
                    # gets a clone of the output, so ∂L/∂out is taken at the product itself.
                    if self.tangents:
                        node = _Node(func, None, None, None, None)
                        node.du = _frozen(fwAD.unpack_dual(u).tangent)
                        node.dw = _frozen(fwAD.unpack_dual(w).tangent)
                    else:
                        node = _Node(func, u.clone(), w.clone(), B, out)
                        out = out.clone()
                    self.nodes.append(node)
                    return out
        return func(*args, **kwargs)


def _theta_dependent(a) -> bool:
    if isinstance(a, (list, tuple)):
        return any(_theta_dependent(b) for b in a)
    if not isinstance(a, Tensor):
        return False
    return a.requires_grad or fwAD.unpack_dual(a).tangent is not None


def _frozen(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().clone()


def _call(model, values: Dict[str, Tensor], inputs):
    """``model(*args, **kwargs)`` with ``values`` substituted; ``inputs`` a tensor, a tuple of
    positional inputs or a dict of keyword inputs (:mod:`oba_ext.inputs`)."""
    args, kwargs = call_args(inputs)
    return functional_call(model, values, args, kwargs, strict=False, tie_weights=True)


def module_generators(model: torch.nn.Module):
    """The ``torch.Generator`` objects held as attributes by ``model``'s modules (a forward
    drawing ``torch.rand(..., generator=self.gen)``), each once."""
    found = {}
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Generator):
                found[id(v)] = v
    return list(found.values())


class FunctionalModel:
    """The model as a function of named tensors, with fixed buffers (cloned per call) and a
    fixed RNG state (replayed per call)."""

    def __init__(self, model: torch.nn.Module, inputs, targets, loss_fn: Callable):
        self.model, self.inputs, self.targets, self.loss_fn = model, inputs, targets, loss_fn
        self.buffers = {n: b for n, b in model.named_buffers()}
        self._cpu_rng = torch.get_rng_state()
        dev = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._cuda = dev.type == "cuda"
        self._cuda_rng = torch.cuda.get_rng_state(dev) if self._cuda else None
        self._device = dev
        # generators the model owns (torch.rand(..., generator=self.gen)), Python's random and
        # NumPy's: replayed too
        self._gens = module_generators(model)
        self._state = model_prep.rng_state(self._gens)

    @contextlib.contextmanager
    def _rng(self):
        # Every pass starts from the RNG state the batch began with, so train-mode dropout
        # draws the same mask in every pass; afterwards the global RNG is where one forward of
        # the model leaves it (each batch draws fresh masks, as the engine's forward does).
        torch.set_rng_state(self._cpu_rng)
        if self._cuda:
            torch.cuda.set_rng_state(self._cuda_rng, self._device)
        model_prep.set_rng_state(self._state, self._gens)
        yield

    def loss(self, values: Dict[str, Tensor], mode: Optional[TorchFunctionMode] = None) -> Tensor:
        """Loss with ``values`` substituted for the named parameters."""
        bufs = {n: b.clone() for n, b in self.buffers.items()}
        mode = mode if mode is not None else BilinearRecorder(record=False)
        with self._rng(), mode, opaque_functions(mode):
            out = _call(self.model, {**bufs, **values}, self.inputs)
            return self.loss_fn(out, self.targets)


def leaves(params: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """Fresh leaf copies that require grad (the caller's ``.grad`` stays untouched)."""
    return {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}


def gradient(fm: FunctionalModel, params: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``∇L`` with respect to ``params`` (a dict of named parameter tensors)."""
    lv = leaves(params)
    loss = fm.loss(lv)
    gs = torch.autograd.grad(loss, list(lv.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(lv.items(), gs)}


def exact_hvp(fm: FunctionalModel, params: Dict[str, Tensor],
              direction: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """``Hθ`` restricted to ``params``, along ``direction`` (default ``δθ = θ`` on ``params``),
    by double backward: ``∇_θ ⟨∇_θ L, sg(δθ)⟩``."""
    lv = leaves(params)
    direction = {n: p.detach() for n, p in params.items()} if direction is None else direction
    loss = fm.loss(lv)
    with checked_double_backward(loss):  # custom Functions must have a differentiable backward
        gs = torch.autograd.grad(loss, list(lv.values()), create_graph=True, allow_unused=True)
    dot = sum((g * direction[n]).sum() for n, g in zip(lv, gs) if g is not None)
    if not isinstance(dot, Tensor) or not dot.requires_grad:
        return {n: torch.zeros_like(p) for n, p in params.items()}
    hv = torch.autograd.grad(dot, list(lv.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if h is None else h for (n, p), h in zip(lv.items(), hv)}


def oba_hvp(fm: FunctionalModel, params: Dict[str, Tensor],
            direction: Optional[Dict[str, Tensor]] = None) -> Dict[str, Tensor]:
    """``Ĥθ`` restricted to ``params`` by the Φ-oracle (SPEC §7.2), along ``direction``
    (default ``δθ = θ`` on ``params``; other parameters are not moved)."""
    direction = {n: p.detach() for n, p in params.items()} if direction is None else direction
    # pass 1: operand tangents along δθ (forward-mode AD)
    tan = BilinearRecorder(record=True, tangents=True)
    try:
        with torch.no_grad(), fwAD.dual_level():
            duals = {n: fwAD.make_dual(p.detach(), direction[n].to(p.dtype))
                     for n, p in params.items()}
            fm.loss(duals, mode=tan)
    except RefusedError:  # already named (a refused op, a Function without jvp)
        raise
    except NotImplementedError:  # a custom autograd.Function without jvp: name it
        diagnose_forward_ad(lambda: fm.loss(leaves(params)))
        raise
    # pass 2: the graph, the operands and g_b = ∂L/∂O_b
    rec = BilinearRecorder(record=True)
    lv = leaves(params)
    loss = fm.loss(lv, mode=rec)
    if len(rec.nodes) != len(tan.nodes) or any(a.func is not b.func for a, b in zip(rec.nodes, tan.nodes)):
        raise RuntimeError("oba oracle: the model took different paths in its two passes "
                           "(data-dependent control flow?)")
    outs = [n.out for n in rec.nodes]
    needs = [i for i, o in enumerate(outs) if o.requires_grad]
    gbs = torch.autograd.grad(loss, [outs[i] for i in needs], retain_graph=True, allow_unused=True)
    phi = None
    for i, g in zip(needs, gbs):
        if g is None:
            continue
        node, t = rec.nodes[i], tan.nodes[i]
        g = g.detach()
        for term in _phi_terms(node, t):
            v = (g * term).sum()
            phi = v if phi is None else phi + v
    if phi is None or not phi.requires_grad:
        return {n: torch.zeros_like(p) for n, p in params.items()}
    hv = torch.autograd.grad(phi, list(lv.values()), allow_unused=True)
    return {n: torch.zeros_like(p) if h is None else h for (n, p), h in zip(lv.items(), hv)}


def _phi_terms(node: _Node, t: _Node):
    """``B(u(θ), sg(ẇ))`` and ``B(sg(u̇), w(θ))``, skipping zero tangents and constants."""
    if t.dw is not None and node.u.requires_grad:
        yield node.B(node.u, t.dw.detach())
    if t.du is not None and node.w.requires_grad:
        yield node.B(t.du.detach(), node.w)
