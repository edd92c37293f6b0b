"""The loss node of the sweep: ``G = ∇ℓ(z)``; ``C = 0`` for ``oba``, ``C = ∇²ℓ · T_z`` for ``exact``.

Hand-written rules (registry :data:`LOSS_RULES`, keyed by function object or loss-module
class) for mean cross-entropy over class indices or probabilities, ``z: (B, K)``::

    p = softmax(z);  G = (p − y) / B;  C = (p⊙T_z − p·(pᵀT_z)) / B     ((diag p − ppᵀ) T_z / B)

and mean squared error, ``G = 2(z − y)/N``, ``C = 2 T_z / N``. Any other loss (or an
unsupported configuration: class weights, label smoothing, ignored targets, other shapes) uses
autograd: ``G = ∇ℓ``, ``C = ∇(∇ℓ · T_z)`` (one double backward through the loss only).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses import default_loss


def _ce(z: Tensor, t_z: Optional[Tensor], y: Tensor, exact: bool):
    if z.dim() != 2 or not (y.dim() == 1 and not y.is_floating_point() or y.shape == z.shape):
        return None
    if y.shape[0] != z.shape[0]:
        return None  # batch-size mismatch: let F.cross_entropy raise its own error (as reference)
    n = z.shape[0]
    p = torch.softmax(z, 1)
    if y.is_floating_point():
        g = (p - y) / n
    else:
        if ((y < 0) | (y >= z.shape[1])).any():
            return None  # ignore_index / invalid: let autograd say what it does
        g = p.clone()
        g[torch.arange(n, device=z.device), y] -= 1
        g = g / n
    c = None
    if exact and t_z is not None:
        pt = p * t_z
        c = (pt - p * pt.sum(1, keepdim=True)) / n
    return g, c


def _mse(z: Tensor, t_z: Optional[Tensor], y: Tensor, exact: bool):
    if y.shape != z.shape:
        return None
    n = z.numel()
    g = (z - y) * (2.0 / n)
    c = t_z * (2.0 / n) if (exact and t_z is not None) else None
    return g, c


def _ce_module(m: nn.CrossEntropyLoss):
    if m.weight is None and m.label_smoothing == 0 and m.reduction == "mean":
        return _ce
    return None


def _mse_module(m: nn.MSELoss):
    return _mse if m.reduction == "mean" else None


#: function object -> rule; loss-module class -> (module -> rule or None)
LOSS_RULES: Dict[object, Callable] = {F.cross_entropy: _ce, F.mse_loss: _mse, default_loss: _ce}
LOSS_MODULE_RULES: Dict[type, Callable] = {nn.CrossEntropyLoss: _ce_module, nn.MSELoss: _mse_module}


def resolve_loss_rule(loss_fn) -> Optional[Callable]:
    """The hand-written rule for ``loss_fn`` (unwrapping ``__wrapped__``), or None."""
    base = loss_fn
    while hasattr(base, "__wrapped__"):
        base = base.__wrapped__
    try:
        rule = LOSS_RULES.get(base)
    except TypeError:
        rule = None
    if rule is not None:
        return rule
    for cls in type(base).__mro__:
        make = LOSS_MODULE_RULES.get(cls)
        if make is not None:
            return make(base)
    return None


def autograd_loss_streams(loss_fn, z: Tensor, t_z: Optional[Tensor], targets, exact: bool
                          ) -> Tuple[Tensor, Optional[Tensor]]:
    """``G = ∇ℓ(z)`` and, for ``exact``, ``C = ∇²ℓ·T_z`` by (double) backward."""
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        loss = loss_fn(zz.clone(), targets)  # a clone: the loss may work on it in place
        want_c = exact and t_z is not None
        (g,) = torch.autograd.grad(loss, zz, create_graph=want_c)
        c = None
        if want_c:
            (c,) = torch.autograd.grad(g, zz, grad_outputs=t_z, allow_unused=True)
            if c is None:
                c = torch.zeros_like(z)
            c = c.detach()
    return g.detach(), c


def structured_loss_streams(loss_fn, leaves, spec, t_leaves, targets, exact: bool):
    """``(G, C)`` for a model returning a structure (tuple, list, dict, ``ModelOutput``):
    ``leaves`` its flattened values (``torch.utils._pytree`` ``spec``, the real output's),
    ``t_leaves`` their tangents (None = 0). Returns two lists aligned with ``leaves``: ``∇ℓ``
    and, for ``exact``, ``∇²ℓ·T`` at each floating tensor leaf (None elsewhere and where zero),
    by (double) backward through the loss only. A value returned twice is one tensor for the
    loss (``o[0] is o[1]``), and its G/C is given at its first position only."""
    from torch.utils import _pytree as pytree
    first = {}  # id(value) -> first position
    for i, x in enumerate(leaves):
        if isinstance(x, Tensor) and x.is_floating_point():
            first.setdefault(id(x), i)
    idx = sorted(first.values())
    with torch.enable_grad():
        req = {i: leaves[i].detach().requires_grad_(True) for i in idx}
        seen = {i: r.clone() for i, r in req.items()}  # not leaves: the loss may work in place
        inp = [seen[first[id(x)]] if isinstance(x, Tensor) and id(x) in first else x
               for x in leaves]
        loss = loss_fn(pytree.tree_unflatten(inp, spec), targets)
        tans = {i: _sum_tangents(t_leaves, leaves, first, i) for i in idx}
        want_c = exact and any(t is not None for t in tans.values())
        gs = torch.autograd.grad(loss, [req[i] for i in idx], create_graph=want_c,
                                 allow_unused=True)
        g_out, c_out = [None] * len(leaves), [None] * len(leaves)
        for i, g in zip(idx, gs):
            g_out[i] = g.detach() if g is not None else None
        if want_c:
            dot = sum((g * tans[i]).sum() for i, g in zip(idx, gs)
                      if g is not None and g.requires_grad and tans[i] is not None)
            if isinstance(dot, Tensor):
                cs = torch.autograd.grad(dot, [req[i] for i in idx], allow_unused=True)
                for i, c in zip(idx, cs):
                    c_out[i] = c.detach() if c is not None else None
    return g_out, c_out


def _sum_tangents(t_leaves, leaves, first, i):
    """The tangent of the value at position ``i`` (the same value returned twice has one)."""
    ts = [t_leaves[j] for j, x in enumerate(leaves)
          if isinstance(x, Tensor) and first.get(id(x)) == i and t_leaves[j] is not None]
    return ts[0] if ts else None


def loss_multiplies(loss_fn, z, targets, spec=None, dependent=None) -> Optional[str]:
    """The name of a bilinear op (matmul, product, ...) inside ``loss_fn`` whose two operands
    both depend on θ through the model output ``z`` (a tensor, or with ``spec`` the list of
    a structure's leaves, ``dependent[i]`` whether leaf i depends on θ), or None.
    SPEC §2 drops the loss's own curvature from Ĥ, while the reference Φ-oracle records every
    bilinear node the loss evaluates; the engine refuses such a loss for ``oba`` rather than
    disagree with it silently (a CLIP-style ``CE(o[0] @ o[1].T)``)."""
    from torch.overrides import TorchFunctionMode
    from torch.utils import _pytree as pytree
    from ..reference.bilinear import BILINEAR
    found = []

    class _Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            split = BILINEAR.get(func)
            if split is not None and not found:
                parts = split(args, kwargs)
                if parts is not None and all(isinstance(p, Tensor) and p.requires_grad
                                             for p in parts[:2]):
                    found.append(getattr(func, "__name__", str(func)))
            return func(*args, **kwargs)

    with torch.enable_grad():
        if spec is not None:
            seen = {}
            inp = []
            for x, dep in zip(z, dependent):
                if isinstance(x, Tensor) and x.is_floating_point() and dep:
                    x = seen.setdefault(id(x), x.detach().requires_grad_(True).clone())
                inp.append(x)
            out = pytree.tree_unflatten(inp, spec)
        else:
            out = z.detach().requires_grad_(True).clone()  # the loss may work in place
        with _Spy():
            loss_fn(out, targets)
    return found[0] if found else None


def loss_streams(rule, loss_fn, z, t_z, targets, exact: bool):
    """(G, C) at the model output for one mode; C is None when it is zero."""
    if rule is not None:
        out = rule(z, t_z, targets, exact)
        if out is not None:
            return out
    return autograd_loss_streams(loss_fn, z, t_z, targets, exact)
