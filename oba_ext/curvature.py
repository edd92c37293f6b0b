"""Curvature products along any direction: :func:`hvp`, :class:`CurvatureOperator`, and the
Hutchinson trace behind the ``hessian_trace`` criterion (README "Curvature products").

Math (SPEC §3/§5 with the direction ``δθ = v`` instead of θ). ``v`` lives on the target
parameters θ (SPEC §1: Linear/Conv weights and biases); names missing from ``v`` move by 0.
At a target layer ``Y = W⊛X + b`` with ``v = (V, v_b)``, the two-stream sweep carries

    forward   T_Y = W⊛T_X + V⊛X + v_b
    backward  G_X = Wᵀ⊛G,   C_X = Wᵀ⊛C + Vᵀ⊛G
    product   (Mv)_W = Σ (Gᵀ T_X + Cᵀ X),   (Mv)_b = Σ C        (Σ: batch and positions)

where ``C`` is the second cotangent of SPEC §3: ``M = H`` (``kind="exact"``: the tangent of
``G``, loss curvature ``C_z = H_loss T_z`` and every op's second-order term), ``M = Ĥ``
(``"oba"``: curvature only from bilinear products, ``C_z = 0``). For ``v = θ`` the ``V⊛X`` and
``Vᵀ⊛G`` terms are the free ``Y`` and ``G`` of SPEC §3 and ``θ ⊙ Mθ`` are the per-weight scores
of SPEC §5. ``kind="ggn"`` is the generalized Gauss-Newton matrix ``J_zᵀ H_loss J_z`` (``z``
the model output): the same forward, ``C_z = H_loss T_z``, then ``C`` alone is pulled back by
the transposed Jacobians (no op curvature anywhere, not even of bilinear products; no ``G``),
and ``(GGN v)_W = Σ Cᵀ X``, ``(GGN v)_b = Σ C``. Cost in GEMM units per layer (SPEC §5, a
gradient = 3): exact/oba 8 (``W⊛[X;T]``, ``V⊛X``, ``Wᵀ⊛[G;C]``, ``Vᵀ⊛G``, one weight gradient
over two streams), ggn 5.

Products are per batch for the batch's mean loss and averaged over batches (like
:func:`oba_ext.score`). The engine (``impl="kernel"``) computes them in one two-stream sweep;
the reference path (``impl="reference"``) uses double backward (exact), the Φ-oracle along
``v`` (oba) and ``torch.func`` (``J_zᵀ H_loss J_z v``, ggn): :mod:`oba_ext.reference.hvp`.
``impl="auto"`` falls back to the reference path, with a warning, where the engine cannot run
(an uncapturable model, or a layer kind whose rule moves along θ only,
``LayerKind.engine_direction``; every built-in kind takes a direction on the engine).
"""
from __future__ import annotations

import warnings
from typing import Dict, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import Tensor, nn

from . import model_prep
from .targets import find_layers, target_parameters

KINDS = ("exact", "oba", "ggn")


# --------------------------------------------------------------------------------- helpers
def check_direction(params: Mapping[str, Tensor], v, what: str = "v",
                    model: Optional[nn.Module] = None) -> Dict[str, Tensor]:
    """Validate a direction ``v`` ({target parameter name: tensor of its shape}) against
    ``params`` and return it on the parameters' device and dtype (detached). ``model``: to name
    the canonical name of a tied parameter passed under another owner's name.

    Raises ``TypeError`` (not a mapping / a value not a tensor) or ``ValueError`` (a name that
    is not a target parameter, a shape mismatch, a non-floating or non-finite tensor).
    """
    if not isinstance(v, Mapping):
        raise TypeError(f"{what}: expected a dict {{target parameter name: tensor}}, got "
                        f"{type(v).__name__}")
    out = {}
    for name, t in v.items():
        if name not in params:
            alias = _tied_alias(model, params, name)
            if alias is not None:
                raise ValueError(f"{what}: {name!r} is the same parameter as {alias!r} (tied "
                                 f"weights are one parameter, named after its first owner); "
                                 f"pass it as {alias!r}")
            known = list(params)
            raise ValueError(f"{what}: {name!r} is not a target parameter of the model; "
                             f"expected names like {known[:4]}{' ...' if len(known) > 4 else ''}")
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}[{name!r}]: expected a tensor, got {type(t).__name__}")
        p = params[name]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"{what}[{name!r}]: shape {tuple(t.shape)} does not match the "
                             f"parameter's {tuple(p.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{what}[{name!r}]: expected a floating tensor, got {t.dtype}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}[{name!r}]: contains NaN or Inf")
        out[name] = t.detach().to(device=p.device, dtype=p.dtype)
    return out


def _tied_alias(model, params: Mapping[str, Tensor], name: str) -> Optional[str]:
    """The name in ``params`` of the tensor ``model`` also calls ``name`` (tied weights)."""
    if model is None:
        return None
    t = dict(model.named_parameters(remove_duplicate=False)).get(name)
    return next((n for n, p in params.items() if p is t), None) if t is not None else None


def make_curvature_scorer(model, layers, loss, impl: str, example, crit=None):
    """A batch scorer with the direction protocol (``scorer(..., direction=)`` and
    ``scorer.hvp``): the engine when it can run it, else :class:`ReferenceCurvature` —
    with a one-time warning for ``impl="auto"``, an error for ``impl="kernel"``."""
    from . import criteria
    from .reference.hvp import ReferenceCurvature
    from .scoring import _make_scorer
    crit = crit if crit is not None else criteria.get("exact")
    sc = _make_scorer(model, layers, loss, impl, crit, example)
    if getattr(sc, "impl", "reference") == "kernel":
        reason = sc.direction_unsupported()
        if reason is not None:
            if impl == "kernel":
                raise RuntimeError(f"impl='kernel': the engine cannot move this model along a "
                                   f"direction ({reason})")
            warnings.warn(f"oba_ext: {reason}; curvature products fall back to the reference "
                          f"path", stacklevel=3)
            sc = None
    else:
        sc = None
    if sc is None:
        sc = ReferenceCurvature(model, layers, loss)
    masks = model_prep.parameter_masks(layers)
    return model_prep.MaskedDirections(sc, masks) if masks else sc


def _check_common(model, impl, max_batches, dtype, loss_fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if impl not in ("auto", "reference", "kernel"):
        raise ValueError(f"impl: expected one of ['auto', 'reference', 'kernel'], got {impl!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches: expected a positive int or None, got {max_batches!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (outputs, targets) -> scalar, got "
                        f"{type(loss_fn).__name__}")


class _Runner:
    """Averages one kind of curvature product over ``batches`` (one scorer, reused)."""

    def __init__(self, model, batches, kind, loss_fn, targets, ignore, max_batches, impl,
                 device, dtype, progress, recompute=False):
        from .scoring import _check_devices, check_recompute, checked_loss, default_loss
        _check_common(model, impl, max_batches, dtype, loss_fn)
        check_recompute(recompute)
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {list(KINDS)}, got {kind!r}")
        model, wrappers = model_prep.unwrap(model)  # as score(): compile / DataParallel / DDP
        targets = model_prep.strip_prefix(targets, wrappers)
        ignore = model_prep.strip_prefix(ignore, wrappers)
        model_prep.check_initialized(model)
        model_device = _check_devices(model)
        if device is not None:
            model_device = torch.device(device)
            model_prep.check_device_available(model_device, "device")
        model = model_prep.copy_to(model, model_device, dtype)
        self.model, self.batches, self.kind = model, batches, kind
        self.device, self.dtype = model_device, dtype
        self.layers = find_layers(model, targets, ignore)
        self.params = target_parameters(self.layers)
        self.loss = checked_loss(loss_fn if loss_fn is not None else default_loss)
        self.max_batches, self.impl, self.progress = max_batches, impl, progress
        self.scorer = None
        self.num_batches = 0
        self.recompute = recompute
        from .reference.oracles import module_generators
        self.gens = module_generators(model)  # the model's own generators, found once

    def _batch_hvp(self, inputs, tgt, v, index, state):
        """One batch's product. The engine may meet something it cannot compute only at run
        time (attention weights feeding the loss): under ``impl="auto"`` this batch and the
        rest run on the reference path with a one-time warning (the batch's random state and
        buffers put back first, so dropout draws the same masks); under "kernel" it raises
        ``RuntimeError`` (``RefusedError`` where every path refuses the cause), as
        :func:`oba_ext.score` does."""
        from .engine import CaptureError
        from .scoring import _kernel_error, _reference_scorer, _restore_buffers
        engine = getattr(self.scorer, "impl", "") == "kernel"
        gens = self.gens
        rng = model_prep.rng_state(gens) if engine else None
        try:
            return self.scorer.hvp(inputs, tgt, self.kind, v)
        except CaptureError as e:
            if not engine:
                raise
            if self.impl == "kernel":
                raise _kernel_error(e)(f"impl='kernel': {e}") from e
            warnings.warn(f"oba_ext.hvp: the fast engine cannot compute this product for "
                          f"{type(self.model).__name__} ({e}); falling back to the reference "
                          f"path from batch {index} on", stacklevel=4)
            _restore_buffers(self.model, state)
            model_prep.set_rng_state(rng, gens)
            self.scorer = _reference_scorer(self.model, self.layers, self.loss, True)
            return self.scorer.hvp(inputs, tgt, self.kind, v)

    def __call__(self, v: Dict[str, Tensor]) -> Dict[str, Tensor]:
        from .scoring import (_batch_context, _check_not_empty, _restore_buffers,
                              _snapshot_buffers, _split_batch, _to)
        sums: Dict[str, Tensor] = {}
        n = 0
        state = _snapshot_buffers(self.model)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm
            bar = tqdm(desc=f"oba_ext.hvp[{self.kind}]", unit="batch", dynamic_ncols=True)
        prepared = model_prep.prepared(self.model)  # masked θ = orig ⊙ mask; eager compiled
        prepared.__enter__()
        try:
            for index, batch in enumerate(self.batches):
                if self.max_batches is not None and index >= self.max_batches:
                    break
                inputs, tgt = _split_batch(batch, index)
                _check_not_empty(inputs, tgt, index)
                inputs = _to(inputs, self.device, self.dtype)
                tgt = _to(tgt, self.device, self.dtype)
                if self.scorer is None:
                    self.scorer = make_curvature_scorer(self.model, self.layers, self.loss,
                                                        self.impl, (inputs, tgt))
                    if self.recompute:
                        from .scoring import set_recompute
                        set_recompute(self.scorer)
                with torch.enable_grad(), _batch_context(index, inputs, tgt, self.model,
                                                         "oba_ext.hvp"):
                    out = self._batch_hvp(inputs, tgt, v, index, state)
                _restore_buffers(self.model, state)
                for name, t in out.items():
                    if not torch.isfinite(t).all():
                        raise FloatingPointError(
                            f"hvp: NaN/Inf in the {self.kind} product of {name!r} at batch "
                            f"{index}; check the inputs, the loss and the direction")
                    t64 = t.detach().to(torch.float64)
                    sums[name] = sums[name] + t64 if name in sums else t64.clone()
                n += 1
                if bar is not None:
                    bar.update(1)
        finally:
            _restore_buffers(self.model, state)
            if bar is not None:
                bar.close()
            prepared.__exit__(None, None, None)
        if n == 0:
            raise ValueError("batches: the iterable yielded no batch (nothing to average)")
        self.num_batches = n
        return {name: (sums[name] / n).to(p.dtype) if name in sums else torch.zeros_like(p)
                for name, p in self.params.items()}


# --------------------------------------------------------------------------------- hvp
def hvp(model: nn.Module, batches: Iterable, v: Mapping[str, Tensor], kind: str = "exact",
        loss_fn=None, targets: Optional[Iterable[str]] = None, ignore: Iterable = (),
        max_batches: Optional[int] = None, impl: str = "auto", device=None,
        dtype: Optional[torch.dtype] = None, progress: bool = False,
        recompute: bool = False) -> Dict[str, Tensor]:
    """Curvature-vector product ``Mv`` over the target parameters, averaged over batches.

    Args:
        model: any ``nn.Module`` (used in the mode it is in, unchanged: parameters, ``.grad``
            and buffers are as before).
        batches: iterable of ``(inputs, targets)`` as in :func:`oba_ext.score`.
        v: ``{qualified target parameter name: tensor of its shape}`` (``"fc.weight"``); names
            missing move by 0. Any floating dtype; cast to the parameters'.
        kind: ``"exact"`` (``M = H = ∇²L``), ``"oba"`` (``M = Ĥ``, OBA's Hessian, SPEC §2) or
            ``"ggn"`` (``M = J_zᵀ H_loss J_z``, the generalized Gauss-Newton matrix).
        loss_fn, targets, ignore, max_batches, impl, device, dtype, progress, recompute: as
            in :func:`oba_ext.score` (``targets``/``ignore`` choose which layers form θ;
            ``recompute``: activation checkpointing of the engine's sweep).

    Returns: ``{name: (Mv)_name}`` for every target parameter of the model (``v``'s names and
    the rest, in module order), each shaped and typed like its parameter: the mean over batches
    of each batch's product for the batch's mean loss (module docstring for the math).

    Raises: ``ValueError``/``TypeError`` naming a bad argument (see :func:`check_direction`),
    :class:`oba_ext.EmptyBatchError` for an empty batch (as :func:`oba_ext.score`),
    ``FloatingPointError`` on NaN/Inf, ``RuntimeError`` for ``impl="kernel"`` where the engine
    cannot run (``"auto"`` falls back to the reference path with a warning).
    """
    r = _Runner(model, batches, kind, loss_fn, targets, ignore, max_batches, impl, device,
                dtype, progress, recompute)
    return r(check_direction(r.params, v, model=r.model))


# --------------------------------------------------------------------------------- operator
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class CurvatureOperator(LinearOperator):
    """``M`` (``H``, ``Ĥ`` or the GGN, averaged over a data set) as a symmetric linear operator
    on the flattened target parameters (names in :attr:`names`, module order).

    A :class:`scipy.sparse.linalg.LinearOperator` (``matvec``, ``matmat``, ``@``, ``shape``,
    ``dtype``; usable by ``eigsh``, ``cg``, ``lobpcg``), whose ``@`` also takes torch tensors
    (``(P,)`` or ``(P, k)``, returning torch tensors on the model's device) like curvlinops'
    operators; ``to_scipy()`` returns itself. Each product is one pass over ``batches`` (one
    engine sweep per batch; columns of a matrix one after the other), so ``batches`` must be
    re-iterable (a list or a DataLoader). Construct with :func:`curvature_operator`.

    Randomness: a model in train mode with dropout (or any random op) would draw new masks in
    every product, and ``M`` would be a different, non-symmetric matrix each time. Every product
    therefore starts from the random state the operator was built with (torch's generators and
    the model's own), so all products see the same masks and ``M`` is one fixed symmetric
    matrix; the caller's random state is put back after each product.
    """

    def __init__(self, runner: _Runner):
        self._runner = runner
        self._gens = runner.gens
        self._rng = model_prep.rng_state(self._gens)
        self.names = list(runner.params)
        self.shapes = [tuple(p.shape) for p in runner.params.values()]
        self.numels = [p.numel() for p in runner.params.values()]
        first = next(iter(runner.params.values()))
        self.torch_dtype, self.device = first.dtype, first.device
        n = sum(self.numels)
        super().__init__(dtype=np.dtype(_NP_DTYPES.get(self.torch_dtype, np.float64)),
                         shape=(n, n))

    @property
    def kind(self) -> str:
        return self._runner.kind

    def unflatten(self, x: Tensor) -> Dict[str, Tensor]:
        """``(P,)`` -> ``{name: tensor}``."""
        return {n: t.view(s) for n, t, s in zip(self.names, x.split(self.numels), self.shapes)}

    def flatten(self, d: Mapping[str, Tensor]) -> Tensor:
        """``{name: tensor}`` -> ``(P,)`` (every name of :attr:`names` must be present)."""
        return torch.cat([d[n].reshape(-1) for n in self.names])

    def _torch_matvec(self, x: Tensor) -> Tensor:
        x = x.detach().to(device=self.device, dtype=self.torch_dtype)
        now = model_prep.rng_state(self._gens)
        model_prep.set_rng_state(self._rng, self._gens)  # the same masks in every product
        try:
            return self.flatten(self._runner(self.unflatten(x)))
        finally:
            model_prep.set_rng_state(now, self._gens)

    def _torch_matmat(self, x: Tensor) -> Tensor:
        if x.dim() == 1:
            return self._torch_matvec(x)
        return torch.stack([self._torch_matvec(x[:, j]) for j in range(x.shape[1])], 1)

    def _matvec(self, x):
        x = np.asarray(x).reshape(-1)
        y = self._torch_matvec(torch.from_numpy(np.ascontiguousarray(x)))
        return y.cpu().numpy().astype(self.dtype, copy=False)

    def _matmat(self, X):
        return np.stack([self._matvec(X[:, j]) for j in range(X.shape[1])], 1)

    _rmatvec = _matvec  # symmetric
    _rmatmat = _matmat

    def _adjoint(self):
        return self

    def __matmul__(self, x):
        if isinstance(x, Tensor):
            if x.dim() not in (1, 2) or x.shape[0] != self.shape[0]:
                raise ValueError(f"CurvatureOperator @ x: expected x of shape ({self.shape[0]},) "
                                 f"or ({self.shape[0]}, k), got {tuple(x.shape)}")
            return self._torch_matmat(x)
        return super().__matmul__(x)

    def to_scipy(self) -> "CurvatureOperator":
        return self


def curvature_operator(model: nn.Module, batches: Iterable, kind: str = "exact", loss_fn=None,
                       targets: Optional[Iterable[str]] = None, ignore: Iterable = (),
                       max_batches: Optional[int] = None, impl: str = "auto", device=None,
                       dtype: Optional[torch.dtype] = None,
                       recompute: bool = False) -> CurvatureOperator:
    """The :class:`CurvatureOperator` of ``kind`` ("exact": the Hessian, "oba", "ggn") over
    ``batches``; the other arguments as in :func:`hvp`. ``TypeError`` for a one-shot iterator
    (every product re-reads the data)."""
    if isinstance(batches, (map, filter, zip)) or (hasattr(batches, "__next__")
                                                    and iter(batches) is batches):
        raise TypeError("batches: got a one-shot iterator; pass a list or a DataLoader (every "
                        "product re-reads the data)")
    return CurvatureOperator(_Runner(model, batches, kind, loss_fn, targets, ignore,
                                     max_batches, impl, device, dtype, False, recompute))


def hutchinson_trace(op, num_samples: int = 100, seed: int = 0) -> float:
    """Hutchinson's estimate ``(1/S) Σ_s z_sᵀ op z_s`` of ``tr(op)`` with Rademacher ``z_s``
    (a :class:`CurvatureOperator` or any operator with ``@`` on ``(P,)`` torch tensors)."""
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
    n = op.shape[0]
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(num_samples):
        z = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        total += float(torch.dot(z, (op @ z.to(getattr(op, "torch_dtype", torch.float64)))
                                 .detach().cpu().to(torch.float64)))
    return total / num_samples


# --------------------------------------------------------------------------------- criterion
def rademacher_direction(params: Mapping[str, Tensor], seed: int, batch_index: int,
                         sample: int) -> Dict[str, Tensor]:
    """The Rademacher (±1) direction of Hutchinson sample ``sample`` at batch ``batch_index``:
    drawn on the CPU from a generator seeded by ``(seed, batch_index, sample)`` in parameter
    order, so it is the same for every implementation, device and resumed run."""
    gen = torch.Generator().manual_seed(
        (int(seed) * 1_000_003 + int(batch_index) * 10_007 + int(sample)) % (2 ** 63 - 1))
    return {n: (torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(device=p.device,
                                                                         dtype=p.dtype)
            for n, p in params.items()}


def check_trace_options(opts: Dict) -> Dict:
    n, seed, weighted = opts["num_samples"], opts["seed"], opts["weighted"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"criterion_options['num_samples']: expected a positive int, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"criterion_options['seed']: expected an int, got {seed!r}")
    if not isinstance(weighted, bool):
        raise ValueError(f"criterion_options['weighted']: expected a bool, got {weighted!r}")
    return opts


def hutchinson_batch(scorer, inputs, targets, keys: Sequence[str], options: Dict,
                     batch_index: int):
    """One batch of the ``hessian_trace`` criterion: ``{layer: {"hessian_trace": {key: t}}}``.

    For Rademacher ``z`` over all target parameters, ``E[Σ_{i∈c} z_i (Hz)_i] = tr(H_cc)``, the
    trace of channel ``c``'s diagonal Hessian block (``c``: an output channel's row and bias, an
    input channel's column, one weight). Each sample is one ``exact`` sweep along ``z``
    (``score(kind="exact", direction=z)``); the batch value is the mean over
    ``options["num_samples"]`` samples (:func:`rademacher_direction`). With
    ``options["weighted"]`` it is multiplied by ``‖θ_c‖² / n_c`` (``n_c`` parameters in the
    channel): Hessian-aware pruning's ``tr(H_cc)/n_c · ‖θ_c‖²`` (its ½ dropped: ranking only).
    """
    from .reference.structured import reduce_layer
    layers = scorer.layers
    params = target_parameters(layers)
    n = options["num_samples"]
    acc: Dict[str, Dict[str, Tensor]] = {}
    for s in range(n):
        z = rademacher_direction(params, options["seed"], batch_index, s)
        q = scorer(inputs, targets, ("exact",), keys, direction=z)
        for layer, by_q in q.items():
            d = acc.setdefault(layer, {})
            for key, t in by_q.get("exact", {}).items():
                t = t.to(torch.float64)
                d[key] = d[key] + t if key in d else t
    out = {}
    for layer, d in acc.items():
        vals = {k: t / n for k, t in d.items()}
        if options["weighted"]:
            spec = layers[layer]
            sq = reduce_layer(spec, {p: spec.param(p).detach().to(torch.float64) ** 2
                                     for p in spec.params}, tuple(vals))
            cnt = reduce_layer(spec, {p: torch.ones_like(spec.param(p), dtype=torch.float64)
                                      for p in spec.params}, tuple(vals))
            vals = {k: t * sq[k] / cnt[k] for k, t in vals.items() if k in sq}
        out[layer] = {"hessian_trace": vals}
    return out


__all__ = ["KINDS", "CurvatureOperator", "check_direction", "curvature_operator", "hvp",
           "hutchinson_batch", "hutchinson_trace", "make_curvature_scorer",
           "rademacher_direction"]
