"""Dropout and stochastic depth: one random mask per batch, applied to every stream.

    y = x ⊙ M,   T_y = T ⊙ M,   G_x = G ⊙ M,   C_x = C ⊙ M      (M: the scaled keep-mask)

In train mode (``p > 0``) the mask is drawn once, in the forward sweep, by calling the op
itself on a tensor of ones shaped like its input — ``F.dropout(ones, p, True)``,
``F.dropout2d(...)``, torchvision's ``stochastic_depth(ones, p, mode, True)`` — which makes
exactly the random draws the model's own call would make on ``x`` (same shape, dtype and
device) and returns ``M`` (``x ⊙ M`` is what the op returns). The reference path draws its mask
the same way (:data:`oba_ext.reference.decompose.RANDOM_MASKS`) from the RNG state the batch
starts with, so under the same seed both paths score the same network; like one forward of the
model, scoring a batch advances torch's global RNG by these draws, so every batch gets fresh
masks. Inactive (eval mode or ``p = 0``): the identity.

``nn.AlphaDropout``/``FeatureAlphaDropout`` in train mode are refused (an affine map with a
random offset, not a mask); so is attention dropout (see :mod:`.attention`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import RefusedError
from . import register_function, register_module

_DROPOUT_ARGS = ("input", "p", "training", "inplace")
_MODULE_FN = {nn.Dropout: F.dropout, nn.Dropout1d: F.dropout1d, nn.Dropout2d: F.dropout2d,
              nn.Dropout3d: F.dropout3d}


class MaskRule:
    """``MaskRule(draw)``; ``draw(call) -> (fn, args_after_input)`` or ``None`` when inactive:
    the mask is ``fn(ones_like(x), *args_after_input)``."""

    def __init__(self, draw):
        self.draw = draw

    def forward(self, call, ctx):
        x, t = call.inputs[0], call.tangents[0]
        ctx.n_inputs = len(call.inputs)
        plan = self.draw(call)
        if plan is None:
            ctx.mask = None
            return x, t
        fn, rest = plan
        mask = fn(torch.ones(x.shape, dtype=x.dtype, device=x.device), *rest)
        ctx.mask = mask
        return x * mask, (t * mask if t is not None else None)

    def backward(self, ctx, g, c):
        m = ctx.mask
        if m is None:
            return [(g, c)] + [None] * (ctx.n_inputs - 1)
        return [(g * m, c * m if c is not None else None)] + [None] * (ctx.n_inputs - 1)


def _dropout_plan(fn):
    def draw(call):
        m = call.module
        if m is not None:
            p, training = m.p, m.training
            fn_ = next(_MODULE_FN[c] for c in type(m).__mro__ if c in _MODULE_FN)
        else:
            a = dict(zip(_DROPOUT_ARGS, call.args))
            a.update(call.kwargs)
            p, training, fn_ = a.get("p", 0.5), a.get("training", True), fn
        if not training or p == 0:
            return None
        return fn_, (p, True)
    return draw


DROPOUT = MaskRule(_dropout_plan(F.dropout))
register_module(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)(DROPOUT)
register_function(F.dropout)(DROPOUT)
register_function(F.dropout1d)(MaskRule(_dropout_plan(F.dropout1d)))
register_function(F.dropout2d)(MaskRule(_dropout_plan(F.dropout2d)))
register_function(F.dropout3d)(MaskRule(_dropout_plan(F.dropout3d)))


class AlphaDropoutRule(MaskRule):
    """``nn.AlphaDropout`` / ``F.alpha_dropout``: the identity when inactive, refused in train
    mode."""

    def __init__(self):
        super().__init__(self._plan)

    @staticmethod
    def _active(module, args, kwargs):
        if module is not None:
            return module.training and module.p > 0
        a = dict(zip(_DROPOUT_ARGS, args))
        a.update(kwargs)
        training, p = a.get("training", False), a.get("p", 0.5)
        return bool(training) and p > 0

    def _plan(self, call):
        if self._active(call.module, call.args, call.kwargs):
            raise RefusedError(f"{call.node.name}: alpha dropout in train mode is not supported; "
                               f"call model.eval()")
        return None

    def capture_check(self, node, module):
        try:
            active = self._active(module, node.args, node.kwargs)
        except TypeError:  # a traced value: decided at run time
            return None
        if active is True:
            return RefusedError(f"node {node.name!r}: alpha dropout in train mode (an affine "
                                f"map with a random offset) is not supported (on any path); "
                                f"call model.eval()")
        return None


_ALPHA = AlphaDropoutRule()
register_module(nn.AlphaDropout, nn.FeatureAlphaDropout)(_ALPHA)
register_function(F.alpha_dropout, F.feature_alpha_dropout)(_ALPHA)

try:  # torchvision's stochastic depth (EfficientNet, ConvNeXt, Swin)
    from torchvision.ops import stochastic_depth as _stochastic_depth
except Exception:  # torchvision is optional
    _stochastic_depth = None

if _stochastic_depth is not None:
    def _sd_plan(call):
        a = dict(zip(("input", "p", "mode", "training"), call.args))
        a.update(call.kwargs)
        p, mode, training = a.get("p", 0.0), a.get("mode", "row"), a.get("training", True)
        if not training or p == 0:
            return None
        return _stochastic_depth, (p, mode, True)

    register_function(_stochastic_depth)(MaskRule(_sd_plan))
