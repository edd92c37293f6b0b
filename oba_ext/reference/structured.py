"""Per-parameter scores -> channel scores, per layer kind (SPEC §5).

``out``: per output channel o, the weights of row o plus bias o. ``in``: per input channel j,
the weights of column j in every output row that reads it (grouped/depthwise conv: only the
rows of j's group). Norm layers: per channel, γ_c + β_c. Each layer kind's reduction is its
:attr:`oba_ext.layers.LayerKind.reduce` (one file per kind in :mod:`oba_ext.layers`); a
reduction returns only the keys it can produce.
"""
from __future__ import annotations

from typing import Dict, Iterable

from torch import Tensor

from ..layers import weight_in, weight_out  # noqa: F401  (re-exported: the dense reductions)
from ..targets import LayerSpec


def reduce_layer(spec: LayerSpec, per_param: Dict[str, Tensor], keys: Iterable[str]) -> Dict[str, Tensor]:
    """``per_param``: local parameter name -> per-parameter scores of layer ``spec``;
    returns ``{key: channel scores}`` for the ``keys`` its kind produces."""
    return spec.layer_kind.reduce(spec.module, per_param, keys)
