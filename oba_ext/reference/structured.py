"""Per-parameter scores -> channel scores, per layer kind (SPEC §5).

``out``: per output channel o, the weights of row o plus bias o. ``in``: per input channel j,
the weights of column j in every output row that reads it (grouped/depthwise conv: only the
rows of j's group). Norm layers: per channel, γ_c + β_c. Reducers are looked up by layer kind
in :data:`REDUCERS`; a reducer returns only the keys it can produce.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import Tensor

from ..targets import LayerSpec


def weight_out(w: Tensor, b: Optional[Tensor]) -> Tensor:
    """(C_out, ...) -> (C_out,): sum of each output row, plus the bias."""
    out = w.reshape(w.shape[0], -1).sum(1)
    return out if b is None else out + b


def weight_in(w: Tensor, groups: int = 1) -> Tensor:
    """(C_out, C_in/groups, *k) -> (C_in,): per input channel, summed over the rows that read it."""
    c_out, c_in_g = w.shape[0], w.shape[1]
    w2 = w.reshape(groups, c_out // groups, c_in_g, -1).sum(dim=(1, 3))  # (groups, C_in/groups)
    return w2.reshape(groups * c_in_g)


def _dense(spec: LayerSpec, s: Dict[str, Tensor], keys: Iterable[str]) -> Dict[str, Tensor]:
    w, b = s["weight"], s.get("bias")
    groups = getattr(spec.module, "groups", 1)
    res = {}
    for k in keys:
        if k == "out":
            res[k] = weight_out(w, b)
        elif k == "in":
            res[k] = weight_in(w, groups)
        elif k == "weight":
            res[k] = w
        elif k == "bias" and b is not None:
            res[k] = b
    return res


def _mha(spec: LayerSpec, s: Dict[str, Tensor], keys: Iterable[str]) -> Dict[str, Tensor]:
    """nn.MultiheadAttention's input projection: out (3E,) = q|k|v rows; in (E,) when packed."""
    b = s.get("in_proj_bias")
    bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
    packed = "in_proj_weight" in s
    ws = s["in_proj_weight"].chunk(3) if packed else (s["q_proj_weight"], s["k_proj_weight"],
                                                     s["v_proj_weight"])
    res = {}
    for k in keys:
        if k == "out":
            res[k] = torch.cat([weight_out(w, bb) for w, bb in zip(ws, (bq, bk, bv))])
            for name, w, bb in zip("qkv", ws, (bq, bk, bv)):
                res[f"parts.{name}.out"] = weight_out(w, bb)
        elif k == "in":
            for name, w in zip("qkv", ws):
                res[f"parts.{name}.in"] = weight_in(w)
            if packed:
                res[k] = weight_in(s["in_proj_weight"])
        elif k == "weight":
            if packed:
                res[k] = s["in_proj_weight"]
            else:
                for name, w in zip("qkv", ws):
                    res[f"parts.{name}.weight"] = w
        elif k == "bias" and b is not None:
            res[k] = b
    return res


def _norm(spec: LayerSpec, s: Dict[str, Tensor], keys: Iterable[str]) -> Dict[str, Tensor]:
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


REDUCERS: Dict[str, Callable[[LayerSpec, Dict[str, Tensor], Iterable[str]], Dict[str, Tensor]]] = {
    "linear": _dense,
    "conv": _dense,
    "mha": _mha,
    "norm": _norm,
}


def reduce_layer(spec: LayerSpec, per_param: Dict[str, Tensor], keys: Iterable[str]) -> Dict[str, Tensor]:
    """``per_param``: local parameter name -> per-parameter scores of layer ``spec``."""
    return REDUCERS[spec.kind](spec, per_param, keys)
