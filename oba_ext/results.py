"""Result containers returned by :func:`oba_ext.score`.

A :class:`ScoreResult` maps qualified module names (as in ``model.named_modules()``) to
:class:`LayerScores`. Scores are per-batch sums (SPEC §2/§5), averaged over batches, signed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Mapping, Optional

import torch
from torch import Tensor

#: granularity names accepted by ``score(granularity=...)`` and the LayerScores field they fill.
#: The input-channel scores are called "in" wherever a string names them (granularity, the
#: scorers' keys, ``per_batch`` keys); the attribute is ``.inp`` because ``in`` is a Python
#: keyword, and :meth:`LayerScores.tensors` is keyed by attribute name (so ``"inp"``).
GRANULARITIES = {"out": "out", "in": "inp", "weight": "weight", "head": "head"}


@dataclass
class LayerScores:
    """Scores of one target layer.

    out:    (C_out,)  per output channel: the weights of row o plus bias o.
    inp:    (C_in,)   per input channel: the weights of column j (all output rows that read it);
            granularity ``"in"`` (the attribute alone is named ``inp``: ``in`` is a keyword).
    weight: like ``module.weight`` (per-weight scores), when "weight" is requested.
    bias:   like ``module.bias`` (or None), when "weight" is requested.
    head:   (num_heads,) per attention head, for attention layers when "head" is requested.
    parts:  named sub-scores, e.g. ``{"q.out": ..., "k.out": ..., "v.out": ...}`` for a packed
            qkv projection.
    per_batch: when ``keep_per_batch=True``, ``{granularity: [tensor per batch]}``.
    """

    out: Optional[Tensor] = None
    inp: Optional[Tensor] = None
    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    head: Optional[Tensor] = None
    parts: Dict[str, Tensor] = field(default_factory=dict)
    per_batch: Optional[Dict[str, List[Tensor]]] = None

    def tensors(self) -> Dict[str, Tensor]:
        """All non-None score tensors by field name (``parts`` entries prefixed ``parts.``)."""
        d = {k: getattr(self, k) for k in ("out", "inp", "weight", "bias", "head")}
        d = {k: v for k, v in d.items() if v is not None}
        d.update({f"parts.{k}": v for k, v in self.parts.items()})
        return d

    def by_key(self) -> Dict[str, Tensor]:
        """:meth:`tensors` keyed by score-key name, as strings name them everywhere
        (granularity, ``per_batch``, the CLI's scores.pt/scores.json): ``"in"``, not ``"inp"``."""
        return {("in" if k == "inp" else k): v for k, v in self.tensors().items()}


class ScoreResult(Mapping[str, LayerScores]):
    """Mapping ``layer name -> LayerScores`` plus run metadata.

    Attributes: ``kind``, ``granularity``, ``num_batches``, ``impl`` (the path that ran:
    "reference" or "kernel").
    """

    def __init__(self, layers: Dict[str, LayerScores], *, kind: str, granularity, num_batches: int,
                 impl: str):
        self.layers = dict(layers)
        self.kind = kind
        self.granularity = tuple(granularity)
        self.num_batches = int(num_batches)
        self.impl = impl

    def __getitem__(self, name: str) -> LayerScores:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"no scores for layer {name!r}; scored layers: {sorted(self.layers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (f"ScoreResult(kind={self.kind!r}, impl={self.impl!r}, num_batches={self.num_batches}, "
                f"layers={list(self.layers)})")

    def summary(self) -> str:
        """A per-layer table: shapes and mean |score| per granularity."""
        rows = [f"{'layer':<32} {'gran':<8} {'shape':<18} {'mean|s|':>11} {'max|s|':>11}"]
        for name, ls in self.layers.items():
            for g, t in ls.by_key().items():
                a = t.detach().abs().double()
                rows.append(f"{name:<32} {g:<8} {str(tuple(t.shape)):<18} "
                            f"{a.mean().item():>11.4e} {a.max().item():>11.4e}")
        return "\n".join(rows)
