"""``nn.ConvTranspose1d/2d``: weight (C_in, C_out/groups, *k), bias (C_out,).

out o (group g = o // (C_out/groups), column j = o mod (C_out/groups)): the weights
``W[g·C_in/groups : (g+1)·C_in/groups, j]`` plus bias o; in i: the weights ``W[i]`` (every output
channel i feeds). Engine rule: :class:`oba_ext.engine.rules.conv.ConvTransposeRule`.
Torch-Pruning prunes it with its conv functions (they check ``layer.transposed``).
"""
from __future__ import annotations

from torch import Tensor, nn

from .base import LayerKind, reduce_rows_cols, tp_in, tp_out, zero_shape_dense


def transposed_out(w: Tensor, b, groups: int) -> Tensor:
    """(C_in, C_out/groups, *k) -> (C_out,): per output channel, plus the bias."""
    c_in, c_out_g = w.shape[0], w.shape[1]
    o = w.reshape(groups, c_in // groups, c_out_g, -1).sum(dim=(1, 3)).reshape(groups * c_out_g)
    return o if b is None else o + b


def transposed_in(w: Tensor) -> Tensor:
    """(C_in, C_out/groups, *k) -> (C_in,)."""
    return w.reshape(w.shape[0], -1).sum(1)


def _reduce(m, s, keys):
    w, b = s["weight"], s.get("bias")
    return reduce_rows_cols(keys, w, b, lambda: transposed_out(w, b, m.groups),
                            lambda: transposed_in(w))


CONV_TRANSPOSE = LayerKind(
    name="conv_transpose", module_types=(nn.ConvTranspose1d, nn.ConvTranspose2d),
    params=("weight", "bias"), keys=("out", "in", "weight", "bias"),
    shape=zero_shape_dense(lambda m: m.out_channels, lambda m: m.in_channels), reduce=_reduce,
    tp_handlers={"prune_conv_out_channels": tp_out, "prune_conv_in_channels": tp_in},
    channels=lambda m: int(m.out_channels))

KINDS = (CONV_TRANSPOSE,)
