"""Normalization layers (BatchNorm1d/2d, LayerNorm, GroupNorm): never moved by δθ; their
channels (γ_c + β_c) are scored only by criteria that ask for them (the Jacobian Criterion,
SPEC §6). Engine rules: :mod:`oba_ext.engine.rules.norm`.
"""
from __future__ import annotations

from torch import nn

from .base import LayerKind, tp_out


def _reduce(m, s, keys):
    w, b = s.get("weight"), s.get("bias")
    res = {}
    for k in keys:
        if k == "out":
            parts = [t.reshape(-1) for t in (w, b) if t is not None]
            res[k] = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        elif k == "weight" and w is not None:
            res[k] = w
        elif k == "bias" and b is not None:
            res[k] = b
    return res


NORM = LayerKind(
    name="norm", module_types=(nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm),
    params=("weight", "bias"), keys=("out",),
    shape=lambda m, k: (m.weight.numel(),) if k == "out" else None, reduce=_reduce,
    tp_handlers={"prune_batchnorm_out_channels": tp_out, "prune_layernorm_out_channels": tp_out,
                 "prune_groupnorm_out_channels": tp_out},
    channels=lambda m: int(m.weight.numel()), target=False)

KINDS = (NORM,)
