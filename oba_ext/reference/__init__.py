"""Pure-PyTorch reference implementations: same-named twins of every kernel op, and the
whole-model oracles of SPEC §7 behind :class:`ReferenceScorer` (``impl="reference"``)."""
from __future__ import annotations

import importlib
from typing import Dict, Iterable, Sequence

from torch import Tensor

from .quantities import QUANTITIES, BatchContext, register_quantity
from .structured import reduce_layer

# optional quantity modules (baseline criteria); each registers itself on import
for _mod in ("baselines", "fastoba"):
    try:
        importlib.import_module(f"{__name__}.{_mod}")
    except ModuleNotFoundError as _e:
        if _e.name != f"{__name__}.{_mod}":
            raise


class ReferenceScorer:
    """Batch scorer (protocol of :mod:`oba_ext.scoring`) on the exact autograd oracles."""

    impl = "reference"

    def __init__(self, model, layers, loss_fn):
        self.model, self.layers, self.loss_fn = model, layers, loss_fn
        self.include_norm = any(s.kind == "norm" for s in layers.values())

    def __call__(self, inputs, targets, quantities: Sequence[str], keys: Iterable[str]):
        ctx = BatchContext(self.model, self.layers, inputs, targets, self.loss_fn,
                           include_norm=self.include_norm)
        keys = tuple(keys)
        res: Dict[str, Dict[str, Dict[str, Tensor]]] = {name: {} for name in self.layers}
        for q in quantities:
            fn = QUANTITIES.get(q)
            if fn is None:
                raise ValueError(f"reference path: unknown quantity {q!r}; known: {sorted(QUANTITIES)}")
            per_param = fn(ctx)
            for name, spec in self.layers.items():
                local = {p: per_param[spec.qualified(p)] for p in spec.params
                         if spec.qualified(p) in per_param}
                if local:
                    res[name][q] = reduce_layer(spec, local, keys)
        return {n: d for n, d in res.items() if d}


__all__ = ["ReferenceScorer", "BatchContext", "QUANTITIES", "register_quantity"]
