"""``nn.Embedding``: weight (V, D), no bias; ``Y = W[idx]`` (a Linear of a one-hot input).

Its channels are the embedding dimensions, as in LLM pruning: out d (D,) = column d of W;
in v (V,) = row v (the one-hot input channel v). Engine rule:
:class:`oba_ext.engine.rules.linear.EmbeddingRule`. Torch-Pruning prunes the embedding
dimension (``prune_embedding_out_channels``) -> ``out``.

``padding_idx``: torch gives that row no gradient (a fixed pad, never updated), so it is not
moved either: δθ = 0 on it, and all its scores are 0.
"""
from __future__ import annotations

from torch import nn

from .base import LayerKind, reduce_rows_cols, tp_out


def _reduce(m, s, keys):
    w = s["weight"]
    return reduce_rows_cols(keys, w, None, lambda: w.sum(0), lambda: w.sum(1))


def _shape(m, k):
    return {"out": (m.embedding_dim,), "in": (m.num_embeddings,),
            "weight": tuple(m.weight.shape)}.get(k)


def _direction(m, local, t):
    if m.padding_idx is None:
        return t.detach()
    d = t.detach().clone()
    d[m.padding_idx] = 0
    return d


EMBEDDING = LayerKind(
    name="embedding", module_types=(nn.Embedding,), params=("weight",),
    keys=("out", "in", "weight"), shape=_shape, reduce=_reduce,
    # Torch-Pruning's embedding in-pruning function is the same object as the out one
    tp_handlers={"prune_embedding_out_channels": tp_out},
    channels=lambda m: int(m.embedding_dim), direction=_direction)

KINDS = (EMBEDDING,)
