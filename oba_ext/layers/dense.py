"""``nn.Linear`` and ``nn.Conv1d/2d``: weight (C_out, C_in/groups, *k), bias (C_out,).

out: rows of W plus bias (C_out,); in: columns of W over the rows that read them (C_in,;
grouped/depthwise conv: only the rows of the column's group). Engine rules:
:mod:`oba_ext.engine.rules.linear`, :mod:`oba_ext.engine.rules.conv`.
"""
from __future__ import annotations

from torch import nn

from .base import LayerKind, reduce_rows_cols, tp_depthwise, tp_in, tp_out, weight_in, weight_out, \
    zero_shape_dense


def _reduce(m, s, keys):
    w, b = s["weight"], s.get("bias")
    return reduce_rows_cols(keys, w, b, lambda: weight_out(w, b),
                            lambda: weight_in(w, getattr(m, "groups", 1)))


_KEYS = ("out", "in", "weight", "bias")
_CHANNELS = lambda m: int(m.weight.shape[0])  # noqa: E731

LINEAR = LayerKind(
    name="linear", module_types=(nn.Linear,), params=("weight", "bias"), keys=_KEYS,
    shape=zero_shape_dense(_CHANNELS, lambda m: m.in_features), reduce=_reduce,
    tp_handlers={"prune_linear_out_channels": tp_out, "prune_linear_in_channels": tp_in},
    channels=_CHANNELS)

CONV = LayerKind(
    name="conv", module_types=(nn.Conv1d, nn.Conv2d), params=("weight", "bias"), keys=_KEYS,
    shape=zero_shape_dense(_CHANNELS, lambda m: m.in_channels), reduce=_reduce,
    # (Torch-Pruning's depthwise in-pruning function is the same object as its out-pruning one)
    tp_handlers={"prune_conv_out_channels": tp_out, "prune_conv_in_channels": tp_in,
                 "prune_depthwise_conv_out_channels": tp_depthwise},
    channels=_CHANNELS)

KINDS = (LINEAR, CONV)
