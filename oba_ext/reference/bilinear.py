"""Which torch functions are bilinear products, and how to evaluate their bilinear part.

SPEC §2: Ĥ keeps curvature only where two θ-dependent quantities are multiplied — ``W ⊛ X`` in
Linear/Conv, ``Q Kᵀ`` and ``A V`` in attention, and any other matmul/bmm/einsum or elementwise
product of two activations. Every other op is linearized at its actual forward value.

:data:`BILINEAR` maps a torch function (as seen by a ``TorchFunctionMode``) to a *splitter*
``split(args, kwargs) -> (u, w, B)`` or ``None`` when this call is not a product of two tensors
(e.g. ``x * 2.0``), where ``B(u', w')`` evaluates the call's bilinear part (bias terms dropped,
every non-tensor argument kept). A product where one factor does not depend on θ needs no
special case: its tangent is zero and it receives no gradient.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Split = Optional[Tuple[Tensor, Tensor, Callable[[Tensor, Tensor], Tensor]]]


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _both_tensors(a, b) -> bool:
    return isinstance(a, Tensor) and isinstance(b, Tensor)


def _split_linear(args, kwargs) -> Split:
    x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    return (x, w, lambda u, v: F.linear(u, v)) if _both_tensors(x, w) else None


def _split_conv(conv: Callable, args, kwargs) -> Split:
    x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    stride = _arg(args, kwargs, 3, "stride", 1)
    padding = _arg(args, kwargs, 4, "padding", 0)
    dilation = _arg(args, kwargs, 5, "dilation", 1)
    groups = _arg(args, kwargs, 6, "groups", 1)
    if not _both_tensors(x, w):
        return None
    return x, w, lambda u, v: conv(u, v, None, stride, padding, dilation, groups)


def _split_conv_transpose(conv: Callable, args, kwargs) -> Split:
    # conv_transpose{1,2}d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    rest = [_arg(args, kwargs, i, n, d) for i, n, d in
            ((3, "stride", 1), (4, "padding", 0), (5, "output_padding", 0), (6, "groups", 1),
             (7, "dilation", 1))]
    if not _both_tensors(x, w):
        return None
    return x, w, lambda u, v: conv(u, v, None, *rest)


def _split_binary(op: Callable, args, kwargs) -> Split:
    a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other")
    return (a, b, op) if _both_tensors(a, b) else None


def _split_rbinary(op: Callable, args, kwargs) -> Split:
    # Tensor.__rmul__(self, other) = other * self
    a, b = args[1] if len(args) > 1 else None, args[0]
    return (a, b, op) if _both_tensors(a, b) else None


def _split_einsum(args, kwargs) -> Split:
    eq, ops = args[0], args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = tuple(ops[0])
    if len(ops) != 2 or not _both_tensors(*ops):
        return None
    return ops[0], ops[1], lambda u, v: torch.einsum(eq, u, v)


def _split_tensordot(args, kwargs) -> Split:
    a, b = _arg(args, kwargs, 0, "a"), _arg(args, kwargs, 1, "b")
    dims = _arg(args, kwargs, 2, "dims", 2)
    if not _both_tensors(a, b):
        return None
    return a, b, lambda u, v: torch.tensordot(u, v, dims)


BILINEAR: Dict[Any, Callable[..., Split]] = {
    F.linear: _split_linear,
    F.conv1d: functools.partial(_split_conv, F.conv1d),
    F.conv2d: functools.partial(_split_conv, F.conv2d),
    F.conv3d: functools.partial(_split_conv, F.conv3d),
    F.conv_transpose1d: functools.partial(_split_conv_transpose, F.conv_transpose1d),
    F.conv_transpose2d: functools.partial(_split_conv_transpose, F.conv_transpose2d),
    torch.matmul: functools.partial(_split_binary, torch.matmul),
    Tensor.matmul: functools.partial(_split_binary, torch.matmul),
    Tensor.__matmul__: functools.partial(_split_binary, torch.matmul),
    Tensor.__rmatmul__: functools.partial(_split_rbinary, torch.matmul),
    torch.mm: functools.partial(_split_binary, torch.mm),
    Tensor.mm: functools.partial(_split_binary, torch.mm),
    torch.bmm: functools.partial(_split_binary, torch.bmm),
    Tensor.bmm: functools.partial(_split_binary, torch.bmm),
    torch.mul: functools.partial(_split_binary, torch.mul),
    Tensor.mul: functools.partial(_split_binary, torch.mul),
    Tensor.__mul__: functools.partial(_split_binary, torch.mul),
    Tensor.__rmul__: functools.partial(_split_rbinary, torch.mul),
    torch.einsum: _split_einsum,
    # products of two activations by other names (SPEC §8); addmm/baddbmm/addcmul, GLU,
    # F.bilinear and the recurrent layers are written out in :mod:`.decompose`
    torch.outer: functools.partial(_split_binary, torch.outer),
    Tensor.outer: functools.partial(_split_binary, torch.outer),
    torch.ger: functools.partial(_split_binary, torch.outer),
    Tensor.ger: functools.partial(_split_binary, torch.outer),
    torch.inner: functools.partial(_split_binary, torch.inner),
    Tensor.inner: functools.partial(_split_binary, torch.inner),
    torch.dot: functools.partial(_split_binary, torch.dot),
    Tensor.dot: functools.partial(_split_binary, torch.dot),
    torch.mv: functools.partial(_split_binary, torch.mv),
    Tensor.mv: functools.partial(_split_binary, torch.mv),
    torch.tensordot: _split_tensordot,
}

#: in-place products cannot be re-evaluated as B(u, w); the oracle refuses them rather than
#: silently treating them as linear
INPLACE_PRODUCTS = {Tensor.mul_, Tensor.__imul__, Tensor.addcmul_, Tensor.addmm_,
                    Tensor.baddbmm_, Tensor.addbmm_, Tensor.addmv_, Tensor.addr_}
