"""``nn.MultiheadAttention``: its input projection (packed ``in_proj_weight`` (3E, E) or
separate ``q/k/v_proj_weight``) is scored under the module's name; ``out_proj`` is an
ordinary Linear target. Engine rule: :mod:`oba_ext.engine.rules.attention` (it records every
key it reaches, so no zero-fill shapes).

out (3E,) = q|k|v rows, with ``parts.{q,k,v}.out``; in (E,) when packed, else
``parts.{q,k,v}.in``; weight: ``in_proj_weight`` when packed, else ``parts.{q,k,v}.weight``.
Heads: q/k/v from its own "out", the output projection from ``<name>.out_proj``'s "in".
"""
from __future__ import annotations

import torch
from torch import nn

from .base import HeadGroup, LayerKind, weight_in, weight_out


def _reduce(m, s, keys):
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


def tp_mha_embed(layer, ls, idxs, scores=None, names=None):
    """Embed-dim pruning (Torch-Pruning removes index e from the in_proj columns, the q/k/v
    rows e, E+e, 2E+e, and out_proj's row and column e): every available score of those."""
    E = layer.embed_dim
    idxs_t = torch.as_tensor(idxs, dtype=torch.long)
    parts = []
    if ls is not None:
        if ls.inp is not None and ls.inp.numel() == E:
            parts.append(ls.inp[idxs_t])
        if ls.out is not None and ls.out.numel() == 3 * E:
            parts += [ls.out[idxs_t + k * E] for k in range(3)]
    op = scores.get(names.get(layer.out_proj)) if scores is not None else None
    if op is not None:
        parts += [t[idxs_t] for t in (op.out, op.inp) if t is not None and t.numel() == E]
    return parts


def _heads(name, m):
    E = m.embed_dim
    out_proj = f"{name}.out_proj" if name else "out_proj"
    return HeadGroup(name, m.num_heads, E,
                     tuple((name, p, i * E, E, m.num_heads) for i, p in enumerate("qkv")),
                     None, out_proj)


MHA = LayerKind(
    name="mha", module_types=(nn.MultiheadAttention,),
    params=("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
    keys=("out", "in", "weight", "bias"), shape=lambda m, k: None, reduce=_reduce,
    # prune_multihead_attention_in_channels is the same function as the out one
    tp_handlers={"prune_multihead_attention_out_channels": tp_mha_embed},
    channels=lambda m: int(m.embed_dim), head_layout=_heads)

KINDS = (MHA,)
