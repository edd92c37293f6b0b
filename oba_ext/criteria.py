"""Score kinds as data.

Each :class:`Criterion` says which *base quantities* a batch must provide and how one batch's
quantities become that batch's score. :func:`oba_ext.score` averages the per-batch scores.

Quantities are computed per batch by an implementation. The reference path looks them up in
``oba_ext.reference.quantities.QUANTITIES`` (extensible: a new quantity is a function there);
the engine computes the base quantities. Base quantities, per parameter ``i`` on target layers (SPEC §2), computed by an implementation
(the reference path or the engine) at the requested granularities:

- ``"taylor"``: ``θ_i g_i``                       (first order)
- ``"oba"``:    ``θ_i (Ĥθ)_i``                    (OBA's Hessian, SPEC §2)
- ``"exact"``:  ``θ_i (Hθ)_i``                    (full Hessian)

Structured scores are sums over a channel's parameters of the per-parameter quantity
(SPEC §5), taken per batch *before* any nonlinearity a criterion applies (the Jacobian
Criterion squares the per-batch channel sum, SPEC §6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Mapping, Optional, Tuple

from torch import Tensor

BASE_QUANTITIES = ("taylor", "oba", "exact")


@dataclass(frozen=True)
class Criterion:
    name: str
    quantities: Tuple[str, ...]
    #: one batch: {quantity: tensor at one granularity} -> that batch's score tensor
    per_batch: Callable[[Mapping[str, Tensor]], Tensor]
    description: str
    #: also score BN/LN/GN channels (kind "norm" layers)
    norm_layers: bool = False
    #: implementations that can compute it ("reference", "kernel")
    impls: Tuple[str, ...] = ("reference", "kernel")
    #: applied to the batch-averaged score (e.g. ``torch.sqrt`` for an L2 norm); None = identity
    finalize: Optional[Callable[[Tensor], Tensor]] = None


CRITERIA: Dict[str, Criterion] = {}


def register(c: Criterion) -> Criterion:
    if c.name in CRITERIA:
        raise ValueError(f"criterion {c.name!r} is already registered")
    CRITERIA[c.name] = c
    return c


register(Criterion("taylor", ("taylor",), lambda q: q["taylor"],
                   "first-order Taylor θ⊙∇L"))
register(Criterion("oba", ("oba",), lambda q: q["oba"],
                   "Optimal Brain Apoptosis θ⊙Ĥθ (default)"))
register(Criterion("exact", ("exact",), lambda q: q["exact"],
                   "exact Hessian θ⊙Hθ (= FastOBA at order 2)"))
register(Criterion("delta_exact", ("taylor", "exact"), lambda q: -q["taylor"] + 0.5 * q["exact"],
                   "second-order removal estimate ΔL ≈ −θ⊙g + ½ θ⊙Hθ"))
register(Criterion("delta_oba", ("taylor", "oba"), lambda q: -q["taylor"] + 0.5 * q["oba"],
                   "second-order removal estimate with OBA's Hessian, −θ⊙g + ½ θ⊙Ĥθ"))


def get(kind: str) -> Criterion:
    """The criterion named ``kind``; ``ValueError`` naming the known kinds otherwise."""
    if not isinstance(kind, str) or kind not in CRITERIA:
        raise ValueError(f"kind: unknown score kind {kind!r}; expected one of {sorted(CRITERIA)}")
    return CRITERIA[kind]
