"""Values that carry no stream (SPEC §8): comparisons, masks, indices, and tensors built from
another tensor's shape only.

    y = op(x, ...)     T_y = None,   G_x = C_x = None  (no tangent, no cotangent)

- comparisons and logical ops (``h > 0``, ``torch.eq``, ``isnan``, ``logical_and`` …) and
  index-valued ops (``argmax``, ``argsort``, ``bucketize`` …): their result is boolean or
  integer, piecewise constant in the input;
- ``zeros_like``/``ones_like``/``empty_like``/``full_like``, ``x.new_zeros(...)`` …: the result
  does not depend on the input's values;
- ``rand_like``/``randn_like``/``randint_like``: a random tensor of the input's shape, drawn
  once in the forward (the reference path draws it once per pass from the same RNG state).

``h * (h > 0).float()`` is then an ordinary product with a constant mask. (Casts of a bool or
integer value, ``.float()``, are handled by the cast rule in :mod:`.shape`: a non-floating
input has no tangent to cast.)
"""
from __future__ import annotations

import operator

import torch

from . import register_function, register_method


class NoStreamRule:
    def forward(self, call, ctx):
        ctx.n_inputs = len(call.inputs)
        return call.invoke(call.inputs), None

    def backward(self, ctx, g, c):
        return [None] * ctx.n_inputs


NO_STREAM = NoStreamRule()

_COMPARE = ("eq", "ne", "lt", "le", "gt", "ge", "greater", "greater_equal", "less", "less_equal",
            "not_equal", "isnan", "isinf", "isposinf", "isneginf", "isfinite", "isclose",
            "isreal", "signbit", "logical_and", "logical_or", "logical_not", "logical_xor",
            "argmax", "argmin", "argsort", "bucketize", "searchsorted", "count_nonzero",
            "nonzero", "argwhere", "any", "all", "equal", "bitwise_and", "bitwise_or",
            "bitwise_xor", "bitwise_not")
_LIKE = ("zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
         "randint_like")

register_function(*[getattr(torch, n) for n in _COMPARE + _LIKE if hasattr(torch, n)])(NO_STREAM)
register_function(operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                  operator.not_, operator.invert, operator.and_, operator.or_,
                  operator.xor)(NO_STREAM)
register_method(*[n for n in _COMPARE if hasattr(torch.Tensor, n)],
                "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__invert__",
                "__and__", "__or__", "__xor__", "new_zeros", "new_ones", "new_empty", "new_full",
                "new_tensor", "long", "int", "bool", "short", "byte", "char")(NO_STREAM)
