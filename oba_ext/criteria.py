"""Score kinds as data.

Each :class:`Criterion` says which *base quantities* a batch must provide and how one batch's
quantities become that batch's score. :func:`oba_ext.score` averages the per-batch scores.

Quantities are computed per batch by an implementation: the reference path looks them up in
``oba_ext.reference.quantities.QUANTITIES`` (extensible: a new quantity is a function there);
the engine computes the base quantities. Base quantities, per parameter ``i`` on target layers
(SPEC §2), at the requested granularities:

- ``"taylor"``: ``θ_i g_i``                       (first order)
- ``"oba"``:    ``θ_i (Ĥθ)_i``                    (OBA's Hessian, SPEC §2)
- ``"exact"``:  ``θ_i (Hθ)_i``                    (full Hessian)

Structured scores are sums over a channel's parameters of the per-parameter quantity
(SPEC §5), taken per batch *before* any nonlinearity a criterion applies (the Jacobian
Criterion squares the per-batch channel sum, SPEC §6).

Along a direction ``v`` (``score(direction=v)``, criteria with ``directional=True``: "oba",
"exact") the second-order quantities are ``v_i (Ĥv)_i`` / ``v_i (Hv)_i``. A criterion with
``options`` takes parameters from ``score(criterion_options={...})``; one with ``batch``
computes a batch's quantities itself through the scorer's direction protocol
(``hessian_trace``: Hutchinson samples, :func:`oba_ext.curvature.hutchinson_batch`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

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
    #: the per-batch value is a mean over the batch's samples and the score a mean over all
    #: samples: batches are averaged weighted by their size (else each batch counts once)
    per_sample_mean: bool = False
    #: accepts ``direction=`` in :func:`oba_ext.score` (second-order quantities along ``v``)
    directional: bool = False
    #: criterion parameters with their defaults, set by ``score(criterion_options={...})``
    options: Tuple[Tuple[str, Any], ...] = ()
    #: validates the complete options dict (defaults filled in) and returns it
    check_options: Optional[Callable[[Dict[str, Any]], Dict[str, Any]]] = None
    #: computes one batch's quantities itself instead of ``scorer(inputs, targets,
    #: quantities, keys)``: ``batch(scorer, inputs, targets, keys, options, batch_index)``
    #: -> ``{layer: {quantity: {key: Tensor}}}`` (the scorer has the direction protocol)
    batch: Optional[Callable] = None


CRITERIA: Dict[str, Criterion] = {}


def register(c: Criterion) -> Criterion:
    if c.name in CRITERIA:
        raise ValueError(f"criterion {c.name!r} is already registered")
    CRITERIA[c.name] = c
    return c


register(Criterion("taylor", ("taylor",), lambda q: q["taylor"],
                   "first-order Taylor θ⊙∇L"))
register(Criterion("oba", ("oba",), lambda q: q["oba"],
                   "Optimal Brain Apoptosis θ⊙Ĥθ (default; v⊙Ĥv with direction=v)",
                   directional=True))
register(Criterion("exact", ("exact",), lambda q: q["exact"],
                   "exact Hessian θ⊙Hθ (= FastOBA at order 2; v⊙Hv with direction=v)",
                   directional=True))
register(Criterion("delta_exact", ("taylor", "exact"), lambda q: -q["taylor"] + 0.5 * q["exact"],
                   "second-order removal estimate ΔL ≈ −θ⊙g + ½ θ⊙Hθ"))
# Caveat, measured (benchmarks/results/fidelity_*.md): in a positively homogeneous ReLU network
# θ⊙Ĥθ is a multiple of θ⊙g (SPEC §7.3: (L−1)·θ⊙∇L for a bias-free chain; ≈2.99× in the trained
# digits CNN), so −θ⊙g + ½θ⊙Ĥθ ≈ +½θ⊙g ranks channels backwards there (Spearman −0.50 vs the
# true removal ΔL). Use "oba" as an importance (|score|), as the OBA paper does.
register(Criterion("delta_oba", ("taylor", "oba"), lambda q: -q["taylor"] + 0.5 * q["oba"],
                   "second-order removal estimate with OBA's Hessian, −θ⊙g + ½ θ⊙Ĥθ (ranks "
                   "backwards on ReLU networks, where θ⊙Ĥθ ∝ θ⊙g; see the README)"))


def resolve_options(crit: Criterion, given: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The criterion's options: its defaults updated by ``given`` (``score(criterion_options=)``),
    validated. ``ValueError`` naming an option the criterion does not have."""
    opts = dict(crit.options)
    if given:
        if not isinstance(given, Mapping):
            raise TypeError(f"criterion_options: expected a dict, got {type(given).__name__}")
        for k, v in given.items():
            if k not in opts:
                raise ValueError(f"criterion_options: criterion {crit.name!r} has no option "
                                 f"{k!r}; its options: {sorted(opts) or 'none'}")
            opts[k] = v
    return crit.check_options(opts) if crit.check_options is not None else opts


def get(kind: str) -> Criterion:
    """The criterion named ``kind``; ``ValueError`` naming the known kinds otherwise."""
    if not isinstance(kind, str) or kind not in CRITERIA:
        raise ValueError(f"kind: unknown score kind {kind!r}; expected one of {sorted(CRITERIA)}")
    return CRITERIA[kind]


# ---------------------------------------------------------------------------------------------
# Optimal Brain Connection and baseline criteria (quantities in oba_ext/reference/baselines.py
# and oba_ext/reference/fastoba.py).
# ---------------------------------------------------------------------------------------------
def _sqrt_nonneg(t: Tensor) -> Tensor:
    return t.clamp_min(0).sqrt()


register(Criterion("jacobian", ("taylor",), lambda q: q["taylor"] ** 2,
                   "Optimal Brain Connection's Jacobian Criterion: mean over batches of "
                   "(Σ_m w⊙∇L_batch)² per component (filter+bias, input slice, BN/LN channel)",
                   norm_layers=True))
register(Criterion("magnitude_l1", ("magnitude_l1",), lambda q: q["magnitude_l1"],
                   "L1 magnitude Σ|w| per channel (no gradients)", impls=("reference",)))
register(Criterion("magnitude_l2", ("magnitude_l2",), lambda q: q["magnitude_l2"],
                   "L2 magnitude sqrt(Σw²) per channel (no gradients)", impls=("reference",),
                   finalize=_sqrt_nonneg))
register(Criterion("random", ("random",), lambda q: q["random"],
                   "seeded random scores (seed = torch.initial_seed())", impls=("reference",)))
register(Criterion("taylor_abs", ("taylor_abs",), lambda q: q["taylor_abs"],
                   "first-order Taylor with absolute values Σ|w⊙∇L| per channel",
                   impls=("reference",)))
register(Criterion("fisher", ("fisher",), lambda q: q["fisher"],
                   "diagonal empirical-Fisher OBD w²·mean_n g_n² (per-sample gradients)",
                   impls=("reference",), per_sample_mean=True))
register(Criterion("fastoba2", ("fastoba2",), lambda q: q["fastoba2"],
                   "FastOBA 2nd-order term θ⊙∂(DL[θ]) = θ⊙Hθ by nested autograd",
                   impls=("reference",)))
register(Criterion("fastoba3", ("fastoba3",), lambda q: q["fastoba3"],
                   "FastOBA 3rd-order term θ⊙∂(D²L[θ,θ]) by nested autograd",
                   impls=("reference",)))


# ---------------------------------------------------------------------------------------------
# Curvature-product criteria (oba_ext/curvature.py; README "Curvature products").
# ---------------------------------------------------------------------------------------------
def _hutchinson_batch(*args):
    from .curvature import hutchinson_batch
    return hutchinson_batch(*args)


def _check_trace_options(opts):
    from .curvature import check_trace_options
    return check_trace_options(opts)


register(Criterion("hessian_trace", ("hessian_trace",), lambda q: q["hessian_trace"],
                   "Hutchinson estimate of each channel's Hessian diagonal-block trace tr(H_cc) "
                   "(Hessian-aware pruning); criterion_options num_samples (16), seed (0), "
                   "weighted (False: × ‖θ_c‖²/n_c when True)",
                   options=(("num_samples", 16), ("seed", 0), ("weighted", False)),
                   check_options=_check_trace_options, batch=_hutchinson_batch))
