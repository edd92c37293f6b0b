"""Reference curvature products along any direction (the oracles behind :func:`oba_ext.hvp`).

For a direction ``v`` over the target parameters θ (SPEC §1; names missing from ``v`` move by
0), one batch, its mean loss ``L = ℓ(f_θ(x))``:

- ``exact``: ``Hv = ∇_θ ⟨∇_θ L, sg(v)⟩`` by double backward (:func:`.oracles.exact_hvp`);
- ``oba``:   ``Ĥv`` by the Φ-oracle of SPEC §7.2 with the operand tangents taken along ``v``
  instead of θ (:func:`.oracles.oba_hvp`);
- ``ggn``:   the generalized Gauss-Newton product ``J_zᵀ H_loss J_z v`` (``z = f_θ(x)``, ``J_z``
  its Jacobian in θ, ``H_loss = ∇²_z ℓ``) by ``torch.func``: ``jvp`` of the model for ``J_z v``,
  ``jvp`` of ``grad ℓ`` for ``H_loss (J_z v)``, ``vjp`` of the model for ``J_zᵀ (·)``.

:class:`ReferenceCurvature` is the reference batch scorer extended with the direction protocol
the engine implements: ``scorer(..., direction=v)`` (scores ``v ⊙ Hv`` / ``v ⊙ Ĥv`` reduced to
channels) and ``scorer.hvp(inputs, targets, kind, v)``.
"""
from __future__ import annotations

from typing import Dict, Iterable, Sequence

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from . import ReferenceScorer
from .oracles import BilinearRecorder, FunctionalModel, _call, exact_hvp, oba_hvp
from .quantities import BatchContext
from .structured import reduce_layer

HVP_KINDS = ("exact", "oba", "ggn")


def full_direction(params: Dict[str, Tensor], direction: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``direction`` on every name of ``params`` (zeros where missing), in each parameter's
    dtype and device."""
    return {n: (direction[n].detach().to(device=p.device, dtype=p.dtype) if n in direction
                else torch.zeros_like(p, memory_format=torch.contiguous_format)).detach()
            for n, p in params.items()}


def model_outputs(fm: FunctionalModel, values: Dict[str, Tensor]):
    """``f_θ(x)`` with ``values`` substituted, under the same buffers (cloned), RNG replay and
    attention decomposition as :meth:`FunctionalModel.loss`."""
    bufs = {n: b.clone() for n, b in fm.buffers.items()}
    with fm._rng(), BilinearRecorder(record=False):
        return _call(fm.model, {**bufs, **values}, fm.inputs)


def ggn_vp(fm: FunctionalModel, params: Dict[str, Tensor],
           direction: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``J_zᵀ H_loss J_z v`` restricted to ``params`` (``direction`` as :func:`full_direction`).

    ``z`` is every floating tensor in the model's output — a tensor, or a tuple/dict/
    ``ModelOutput`` of them (other leaves, e.g. a key/value cache object, are held fixed) — and
    ``H_loss`` the Hessian of ``loss_fn(outputs, targets)`` in those tensors jointly."""
    p0 = {n: p.detach() for n, p in params.items()}
    d = full_direction(params, direction)
    leaves, spec = pytree.tree_flatten(model_outputs(fm, p0))
    slots = [i for i, t in enumerate(leaves)
             if isinstance(t, Tensor) and t.is_floating_point()]
    if not slots:
        raise ValueError(f"kind='ggn': the model's output ({type(leaves[0]).__name__ if leaves else 'empty'}) "
                         f"holds no floating tensor to take the loss's Hessian in")

    def rebuild(zs):
        full = list(leaves)
        for i, z in zip(slots, zs):
            full[i] = z
        return pytree.tree_unflatten(full, spec)

    def f(vals):  # θ -> the output's floating tensors (a tuple)
        out = pytree.tree_leaves(model_outputs(fm, vals))
        return tuple(out[i] for i in slots)

    z, jv = torch.func.jvp(f, (p0,), (d,))
    z, jv = tuple(t.detach() for t in z), tuple(t.detach() for t in jv)

    def grad_loss(zz):
        return torch.func.grad(lambda u: fm.loss_fn(rebuild(u), fm.targets))(zz)

    _, hjv = torch.func.jvp(grad_loss, (z,), (jv,))
    _, pullback = torch.func.vjp(f, p0)
    (out,) = pullback(tuple(t.detach() for t in hjv))
    return {n: out[n].detach() for n in params}


def hvp_oracle(kind: str, fm: FunctionalModel, params: Dict[str, Tensor],
               direction: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """``Mv`` for ``kind`` in :data:`HVP_KINDS` (module docstring), one batch."""
    d = full_direction(params, direction)
    if kind == "exact":
        return exact_hvp(fm, params, d)
    if kind == "oba":
        return oba_hvp(fm, params, d)
    if kind == "ggn":
        return ggn_vp(fm, params, d)
    raise ValueError(f"kind: expected one of {list(HVP_KINDS)}, got {kind!r}")


class ReferenceCurvature(ReferenceScorer):
    """:class:`ReferenceScorer` plus the direction protocol (module docstring)."""

    def __call__(self, inputs, targets, quantities: Sequence[str], keys: Iterable[str],
                 direction=None):
        if direction is None:
            return super().__call__(inputs, targets, quantities, keys)
        keys = tuple(keys)
        ctx = BatchContext(self.model, self.layers, inputs, targets, self.loss_fn)
        d = ctx.restrict(full_direction(ctx.params, direction))
        res: Dict[str, Dict[str, Dict[str, Tensor]]] = {name: {} for name in self.layers
                                                        if self.layers[name].kind != "norm"}
        for q in quantities:
            if q not in ("exact", "oba"):
                raise ValueError(f"direction: only the second-order quantities 'oba'/'exact' "
                                 f"move along a direction, not {q!r}")
            hv = hvp_oracle(q, ctx.fm, ctx.params, d)
            per_param = {n: d[n] * hv[n] for n in ctx.params}
            for name in res:
                spec = self.layers[name]
                local = {p: per_param[spec.qualified(p)] for p in spec.params}
                res[name][q] = reduce_layer(spec, local, keys)
        return res

    def hvp(self, inputs, targets, kind: str, direction) -> Dict[str, Tensor]:
        """``{qualified parameter name: (Mv)_param}`` for one batch (module docstring)."""
        ctx = BatchContext(self.model, self.layers, inputs, targets, self.loss_fn)
        return hvp_oracle(kind, ctx.fm, ctx.params,
                          ctx.restrict(full_direction(ctx.params, direction)))


__all__ = ["HVP_KINDS", "ReferenceCurvature", "full_direction", "ggn_vp", "hvp_oracle",
           "model_outputs"]
