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
        loss = loss_fn(zz, targets)
        want_c = exact and t_z is not None
        (g,) = torch.autograd.grad(loss, zz, create_graph=want_c)
        c = None
        if want_c:
            (c,) = torch.autograd.grad(g, zz, grad_outputs=t_z, allow_unused=True)
            if c is None:
                c = torch.zeros_like(z)
            c = c.detach()
    return g.detach(), c


class OutputDict(dict):
    """A dict the model returned, as the loss sees it on the engine. fx traces a dict subclass
    such as a Hugging Face ``ModelOutput`` as a plain dict, so this one also offers what a
    ``ModelOutput`` does: attribute access (``out.logits``) and integer/slice indexing over its
    non-None values (``out[0]``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self):
        return tuple(v for v in self.values() if v is not None)


def _has_dict(z) -> bool:
    return isinstance(z, dict) or (isinstance(z, (list, tuple)) and any(_has_dict(v) for v in z))


def _as_returned(z):
    """fx's immutable dicts (nested too) as :class:`OutputDict`; other values as they are."""
    if isinstance(z, dict):
        return OutputDict((k, _as_returned(v)) for k, v in z.items())
    if isinstance(z, list):  # fx's immutable_list too
        return [_as_returned(v) for v in z]
    if type(z) is tuple:
        return tuple(_as_returned(v) for v in z)
    return z


def structured_loss_streams(loss_fn, leaves, spec, t_leaves, targets, exact: bool):
    """``(G, C)`` for a model returning a tuple/list/dict: ``leaves`` its flattened values
    (``torch.utils._pytree`` ``spec``), ``t_leaves`` their tangents (None = 0). Returns two
    lists aligned with ``leaves``: ``∇ℓ`` and, for ``exact``, ``∇²ℓ·T`` at each floating
    tensor leaf (None elsewhere and where zero), by (double) backward through the loss only."""
    from torch.utils import _pytree as pytree
    idx = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.is_floating_point()]
    with torch.enable_grad():
        req = list(leaves)
        for i in idx:
            req[i] = leaves[i].detach().requires_grad_(True)
        out = _as_returned(pytree.tree_unflatten(req, spec))
        try:
            loss = loss_fn(out, targets)
        except (AttributeError, KeyError, IndexError) as e:
            if not _has_dict(out):
                raise
            # the loss reads something of the real output that the traced dict lacks (a
            # ModelOutput field left None, a method of the output class): not this engine's
            # to guess; the reference path calls the model itself
            from .capture import CaptureError  # noqa: PLC0415 (capture imports the rules)
            raise CaptureError(f"the loss reads {type(e).__name__} {e} from the model's "
                               f"output, which the engine sees as a traced dict (a ModelOutput "
                               f"or dict subclass loses its class in tracing)") from e
        want_c = exact and any(t_leaves[i] is not None for i in idx)
        gs = torch.autograd.grad(loss, [req[i] for i in idx], create_graph=want_c,
                                 allow_unused=True)
        g_out, c_out = [None] * len(leaves), [None] * len(leaves)
        for i, g in zip(idx, gs):
            g_out[i] = g.detach() if g is not None else None
        if want_c:
            dot = sum((g * t_leaves[i]).sum() for i, g in zip(idx, gs)
                      if g is not None and g.requires_grad and t_leaves[i] is not None)
            if isinstance(dot, Tensor):
                cs = torch.autograd.grad(dot, [req[i] for i in idx], allow_unused=True)
                for i, c in zip(idx, cs):
                    c_out[i] = c.detach() if c is not None else None
    return g_out, c_out


def loss_streams(rule, loss_fn, z, t_z, targets, exact: bool):
    """(G, C) at the model output for one mode; C is None when it is zero."""
    if rule is not None:
        out = rule(z, t_z, targets, exact)
        if out is not None:
            return out
    return autograd_loss_streams(loss_fn, z, t_z, targets, exact)
