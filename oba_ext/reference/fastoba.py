"""FastOBA's k-th order terms by nested autograd (reference only).

Definition (normalisation chosen here, and the one the tests check). With the direction
``v = θ`` on the target parameters (0 elsewhere, held fixed: ``v = sg(θ)``) and
``D^k L[v, …, v] = Σ_{i1..ik} ∂^k L/∂θ_{i1}…∂θ_{ik} · v_{i1}…v_{ik}`` the k-th directional
derivative of the batch's mean loss, the per-parameter k-th order score is

    s^(k)_i = θ_i · ∂_i ( D^{k−1} L[v, …, v] ) = θ_i · (∇^k L ×₂ v ×₃ … ×_k v)_i

so ``s^(1) = θ⊙g`` ("taylor") and ``s^(2) = θ⊙Hθ`` ("exact", SPEC §2), and
``Σ_i s^(k)_i = D^k L[θ, …, θ]`` (each score splits the k-th directional derivative over the
parameters). No ``1/k!`` and no sign: the k-th term of the removal estimate
``ΔL = L(θ − θ) − L(θ) = Σ_k (−1)^k/k! · D^k L[θ, …, θ]`` is ``(−1)^k/k! · Σ_i s^(k)_i``,
consistent with ``delta_exact = −taylor + ½ exact``.

Cost: k−1 nested ``create_graph`` backwards plus one, i.e. a (k−1)-th order graph; this is
for validation and small models, hence ``impls=("reference",)`` in the criteria table.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from .quantities import register_quantity


def fastoba_term(ctx, order: int) -> Dict[str, Tensor]:
    """``{name: θ ⊙ ∂(D^{order−1} L[θ, …, θ])/∂θ}`` for the target parameters of one batch.

    ``order >= 1``; uses ``ctx.functional_loss`` (the model's loss with the target parameters
    substituted) and differentiates it ``order`` times.
    """
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"order: expected an int >= 1, got {order!r}")
    names = list(ctx.params)
    theta = {n: ctx.params[n].detach() for n in names}
    leaves = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    f = ctx.functional_loss(leaves)
    for _ in range(order - 1):
        if not f.requires_grad:
            break
        gs = torch.autograd.grad(f, [leaves[n] for n in names], create_graph=True,
                                 allow_unused=True)
        f = sum((g * theta[n]).sum() for n, g in zip(names, gs) if g is not None)
        if not isinstance(f, Tensor):  # every gradient unused: the derivative vanishes
            f = torch.zeros((), dtype=theta[names[0]].dtype)
    if not f.requires_grad:  # a polynomial of lower degree: the k-th derivative is zero
        return {n: torch.zeros_like(t) for n, t in theta.items()}
    gs = torch.autograd.grad(f, [leaves[n] for n in names], allow_unused=True)
    return {n: theta[n] * (g if g is not None else torch.zeros_like(theta[n]))
            for n, g in zip(names, gs)}


def fastoba2(ctx) -> Dict[str, Tensor]:
    """Second-order term ``θ ⊙ Hθ`` (equals ``exact``)."""
    return fastoba_term(ctx, 2)


def fastoba3(ctx) -> Dict[str, Tensor]:
    """Third-order term ``θ ⊙ (∇³L ×₂ θ ×₃ θ)``."""
    return fastoba_term(ctx, 3)


register_quantity("fastoba2", fastoba2)
register_quantity("fastoba3", fastoba3)
