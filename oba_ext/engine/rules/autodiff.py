"""What the rules that run an op through PyTorch's own differentiation share
(:mod:`.generic`, :mod:`.products`, :mod:`.function`): which values carry streams, the op as a
function of its streamed inputs, and forward-mode dual outputs split into values and tangents.
"""
from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import torch
from torch.autograd import forward_ad as fwAD


def is_float(v) -> bool:
    """Whether ``v`` is a floating or complex tensor: only those carry streams (an integer or
    bool tensor, e.g. indices or a mask, carries none)."""
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def streamed_inputs(call) -> List[int]:
    """Positions of the call's floating inputs that carry a tangent or need a cotangent."""
    return [i for i, x in enumerate(call.inputs)
            if is_float(x) and (call.tangents[i] is not None or call.needs[i])]


def op_of(call, positions: Sequence[int]) -> Callable:
    """``f(*xs)``: the call's op (``call.invoke``) with its inputs at ``positions`` replaced by
    ``xs`` in that order and every other input as captured; ``f(*(call.inputs[i] for i in
    positions))`` is the op's value."""
    base = list(call.inputs)

    def f(*xs):
        vals = list(base)
        for i, v in zip(positions, xs):
            vals[i] = v
        return call.invoke(vals)
    return f


def unpack_duals(leaves: Sequence) -> Tuple[list, list]:
    """``(values, tangents)`` of the flat output ``leaves`` of an op run on dual tensors (inside
    ``forward_ad.dual_level``): a tensor leaf's primal and tangent (``None`` where it has none,
    and for a non-floating tensor), any other leaf as it is with tangent ``None``."""
    values, tangents = [], []
    for v in leaves:
        if isinstance(v, torch.Tensor):
            u = fwAD.unpack_dual(v)
            values.append(u.primal)
            tangents.append(u.tangent if is_float(v) else None)
        else:
            values.append(v)
            tangents.append(None)
    return values, tangents
