"""Per-parameter quantities of the reference path, as a registry.

A quantity is ``fn(ctx: BatchContext) -> {qualified parameter name: tensor like the parameter}``;
the reference scorer reduces it to channels (:mod:`.structured`). Base quantities (SPEC §2):

- ``taylor``: ``θ ⊙ ∇L``                (also for BN/LN/GN γ, β when the criterion asks)
- ``oba``:    ``θ ⊙ Ĥθ``  via the Φ-oracle (:func:`.oracles.oba_hvp`)
- ``exact``:  ``θ ⊙ Hθ``  via double backward (:func:`.oracles.exact_hvp`)

New quantities (baseline criteria) register with :func:`register_quantity`.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
from torch import Tensor

from .oracles import FunctionalModel, exact_hvp, gradient, oba_hvp


class BatchContext:
    """What a quantity function may use for one batch.

    model, layers ({name: LayerSpec}), inputs, targets, loss_fn;
    params: qualified name -> target parameter θ (weights/biases of Linear/Conv/MHA);
    norm_params: qualified name -> BN/LN/GN affine parameter (empty unless asked for);
    fm: the :class:`~.oracles.FunctionalModel` (fixed buffers and RNG state for this batch).
    """

    def __init__(self, model, layers, inputs, targets, loss_fn, include_norm: bool = False):
        self.model, self.layers = model, layers
        self.inputs, self.targets, self.loss_fn = inputs, targets, loss_fn
        self.params: Dict[str, Tensor] = {}
        self.norm_params: Dict[str, Tensor] = {}
        for spec in layers.values():
            dest = self.norm_params if spec.kind == "norm" else self.params
            if spec.kind == "norm" and not include_norm:
                continue
            for p in spec.params:
                dest[spec.qualified(p)] = spec.param(p)
        # δθ (SPEC §1): θ, with entries a layer kind never moves set to 0 (LayerKind.direction)
        self.direction: Dict[str, Tensor] = self.restrict(self.params)
        self.fm = FunctionalModel(model, inputs, targets, loss_fn)
        self._grads: Optional[Dict[str, Tensor]] = None

    def restrict(self, direction: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``direction`` (qualified name -> tensor) with the entries a layer kind never moves
        set to 0 (:attr:`oba_ext.layers.LayerKind.direction`; no built-in kind has such
        entries); other names unchanged. Detached."""
        out = {n: t.detach() for n, t in direction.items()}
        for spec in self.layers.values():
            fn = spec.layer_kind.direction
            if fn is None:
                continue
            for p in spec.params:
                n = spec.qualified(p)
                if n in out:
                    out[n] = fn(spec.module, p, out[n])
        return out

    def functional_loss(self, values: Dict[str, Tensor]) -> Tensor:
        """The loss with ``values`` (qualified name -> tensor) substituted for parameters."""
        return self.fm.loss(values)

    def grads(self) -> Dict[str, Tensor]:
        """``∇L`` for every parameter in ``params`` and ``norm_params`` (cached)."""
        if self._grads is None:
            self._grads = gradient(self.fm, {**self.params, **self.norm_params})
        return self._grads


QuantityFn = Callable[[BatchContext], Dict[str, Tensor]]
QUANTITIES: Dict[str, QuantityFn] = {}


def register_quantity(name: str, fn: QuantityFn) -> QuantityFn:
    if name in QUANTITIES:
        raise ValueError(f"quantity {name!r} is already registered")
    QUANTITIES[name] = fn
    return fn


def _taylor(ctx: BatchContext) -> Dict[str, Tensor]:
    g = ctx.grads()
    return {n: p.detach() * g[n] for n, p in {**ctx.params, **ctx.norm_params}.items()}


def _oba(ctx: BatchContext) -> Dict[str, Tensor]:
    hv = oba_hvp(ctx.fm, ctx.params, ctx.direction)
    return {n: p.detach() * hv[n] for n, p in ctx.params.items()}


def _exact(ctx: BatchContext) -> Dict[str, Tensor]:
    hv = exact_hvp(ctx.fm, ctx.params, ctx.direction)
    return {n: p.detach() * hv[n] for n, p in ctx.params.items()}


register_quantity("taylor", _taylor)
register_quantity("oba", _oba)
register_quantity("exact", _exact)
