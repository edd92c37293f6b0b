"""``nn.Embedding``: weight (V, D), no bias; ``Y = W[idx]`` (a Linear of a one-hot input).

Its channels are the embedding dimensions, as in LLM pruning: out d (D,) = column d of W;
in v (V,) = row v (the one-hot input channel v). Engine rule:
:class:`oba_ext.engine.rules.linear.EmbeddingRule`. Torch-Pruning prunes the embedding
dimension (``prune_embedding_out_channels``) -> ``out``.

``padding_idx``: the lookup of that row is a constant (torch's embedding backward gives the row
no gradient from the lookup; the reference path's oracles run ``F.embedding`` so that positions
reading it carry no tangent either, :func:`oba_ext.reference.decompose.embedding_lookup`; the
engine rule zeroes them). The row itself is a parameter like any other: untied, nothing depends
on it, so its scores are 0; tied to an LM head (``head.weight = emb.weight``, e.g. BERT-MLM), it
moves through the head and is scored there. ``max_norm`` and ``scale_grad_by_freq=True`` are
refused by name on every path; ``sparse=True`` is scored with dense gradients (same values).
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


EMBEDDING = LayerKind(
    name="embedding", module_types=(nn.Embedding,), params=("weight",),
    keys=("out", "in", "weight"), shape=_shape, reduce=_reduce,
    # Torch-Pruning's embedding in-pruning function is the same object as the out one
    tp_handlers={"prune_embedding_out_channels": tp_out},
    channels=lambda m: int(m.embedding_dim))

KINDS = (EMBEDDING,)
