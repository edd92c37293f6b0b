"""The one public entry point that walks a model over batches: :func:`score`.

Per-batch protocol (what an implementation provides)
----------------------------------------------------
An implementation is a *batch scorer*: ``scorer(inputs, targets, quantities, granularity)``
returns ``{layer name: {quantity: {key: Tensor}}}`` for one batch, where ``quantity`` is a
base quantity of :mod:`oba_ext.criteria` ("taylor", "oba", "exact") and ``key`` is one of
"out", "in", "weight", "bias", "head", or "parts.<name>" (e.g. "parts.q.out"). Values are the
per-batch sums of SPEC §2/§5 for the batch's mean loss. Two implementations exist:

- ``oba_ext.reference.ReferenceScorer`` (``impl="reference"``): exact pure-autograd oracles
  (SPEC §7) — double backward for ``exact``, the Φ-oracle for ``oba``.
- ``oba_ext.engine.build_scorer`` (``impl="kernel"``): the two-stream sweep of SPEC §3 with
  fused kernels (raises ``oba_ext.engine.CaptureError`` when the model cannot be captured).

This module validates arguments, moves batches, accumulates (float64) and averages the
per-batch criterion values, checks for NaN/Inf, shows progress, checkpoints and all-reduces.
"""
from __future__ import annotations

import copy
import itertools
import os
import warnings
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import criteria as _criteria
from .results import GRANULARITIES, LayerScores, ScoreResult
from .targets import LayerSpec, find_layers

_IMPLS = ("auto", "reference", "kernel")
_CKPT_VERSION = 2  # 2: total_weight (per-sample-mean criteria)


def _normalize_granularity(granularity) -> Tuple[str, ...]:
    if isinstance(granularity, str):
        granularity = (granularity,)
    try:
        gran = tuple(granularity)
    except TypeError:
        raise ValueError(f"granularity: expected a name or a tuple of names from "
                         f"{list(GRANULARITIES)}, got {granularity!r}") from None
    if not gran:
        raise ValueError(f"granularity: empty; expected names from {list(GRANULARITIES)}")
    for g in gran:
        if g not in GRANULARITIES:
            raise ValueError(f"granularity: unknown granularity {g!r}; expected names from "
                             f"{list(GRANULARITIES)}")
    return gran


def _check_devices(model: nn.Module) -> Optional[torch.device]:
    devs = {t.device for t in itertools.chain(model.parameters(), model.buffers())}
    if len(devs) > 1:
        raise ValueError(f"model: parameters and buffers are on mixed devices {sorted(map(str, devs))}; "
                         f"move the model to one device (or pass device=...)")
    return next(iter(devs)) if devs else None


def default_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, the default ``loss_fn``."""
    return nn.functional.cross_entropy(outputs, targets)


def checked_loss(loss_fn: Callable) -> Callable:
    """Wrap ``loss_fn`` so that a non-scalar loss raises a clear ``ValueError``."""
    def wrapped(outputs, targets):
        loss = loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn: must return a scalar tensor (e.g. a mean over the batch), "
                             f"got {shape}")
        return loss
    wrapped.__wrapped__ = loss_fn
    return wrapped


def _to(x, device, dtype):
    if isinstance(x, torch.Tensor):
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device, dtype) for k, v in x.items()}
    return x


def _split_batch(batch, index: int):
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batches: item {index} must be a pair (inputs, targets), got "
                        f"{type(batch).__name__}" + (f" of length {len(batch)}"
                                                     if isinstance(batch, (tuple, list)) else ""))
    return batch[0], batch[1]


def _make_scorer(model, layers, loss_fn, impl: str, crit, example):
    """The registry's choice between the engine and the reference path."""
    from .reference import ReferenceScorer
    if impl == "reference" or "kernel" not in crit.impls:
        if impl == "kernel":
            raise ValueError(f"impl: kind {crit.name!r} has no kernel implementation; "
                             f"use impl='reference' or 'auto'")
        return ReferenceScorer(model, layers, loss_fn)
    try:
        from . import engine
    except ImportError as e:  # the engine is optional until it lands
        if impl == "kernel":
            raise RuntimeError(f"impl='kernel': the engine is unavailable ({e})") from e
        return ReferenceScorer(model, layers, loss_fn)
    build = getattr(engine, "build_scorer", None)
    if build is None:
        if impl == "kernel":
            raise RuntimeError("impl='kernel': the engine is not built into this version")
        return ReferenceScorer(model, layers, loss_fn)
    try:
        return build(model, layers, loss_fn, example)
    except engine.CaptureError as e:
        if impl == "kernel":
            raise RuntimeError(f"impl='kernel': the model cannot be captured: {e}") from e
        warnings.warn(f"oba_ext.score: cannot capture {type(model).__name__} for the fast "
                      f"engine ({e}); falling back to the reference path", stacklevel=3)
        return ReferenceScorer(model, layers, loss_fn)


class _Accumulator:
    """Float64 running sums of per-batch criterion values, keyed (layer, key), each batch
    weighted by ``weight`` (1, or its number of samples for per-sample-mean criteria);
    ``total_weight`` is what the sums are divided by."""

    def __init__(self, keep_per_batch: bool):
        self.sums: Dict[str, Dict[str, torch.Tensor]] = {}
        self.per_batch: Dict[str, Dict[str, list]] = {}
        self.num_batches = 0
        self.total_weight = 0.0
        self.keep = keep_per_batch

    def add(self, values: Dict[str, Dict[str, torch.Tensor]], batch_index: int,
            weight: float = 1.0):
        for layer, d in values.items():
            for key, v in d.items():
                if not torch.isfinite(v).all():
                    bad = "NaN" if torch.isnan(v).any() else "Inf"
                    raise FloatingPointError(
                        f"score: {bad} in the {key!r} score of layer {layer!r} at batch "
                        f"{batch_index}; check the inputs, the loss and the model for overflow "
                        f"(scoring in float64 with dtype=torch.float64 may help)")
                acc = self.sums.setdefault(layer, {})
                v64 = v.detach().to(torch.float64)
                if weight != 1.0:
                    v64 = v64 * weight
                acc[key] = acc[key] + v64 if key in acc else v64.clone()
                if self.keep:
                    self.per_batch.setdefault(layer, {}).setdefault(key, []).append(
                        v.detach().cpu().clone())
        self.num_batches += 1
        self.total_weight += weight

    def state_dict(self):
        return {"sums": {l: {k: v.cpu() for k, v in d.items()} for l, d in self.sums.items()},
                "per_batch": self.per_batch, "num_batches": self.num_batches,
                "total_weight": self.total_weight}

    def load_state_dict(self, st, device):
        self.sums = {l: {k: v.to(device) for k, v in d.items()} for l, d in st["sums"].items()}
        self.per_batch = st["per_batch"]
        self.num_batches = st["num_batches"]
        self.total_weight = st["total_weight"]


def _save_atomic(obj, path: str):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def score(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None, kind: str = "oba",
          granularity: Union[str, Sequence[str]] = ("out", "in"), targets: Optional[Iterable[str]] = None,
          ignore: Iterable = (), max_batches: Optional[int] = None, impl: str = "auto",
          device=None, dtype: Optional[torch.dtype] = None, progress: bool = True,
          keep_per_batch: bool = False, checkpoint: Optional[str] = None,
          checkpoint_every: int = 10, distributed: Optional[bool] = None,
          process_group=None, direction=None, criterion_options=None) -> ScoreResult:
    """Score the target layers of ``model`` over ``batches``.

    Args:
        model: any ``nn.Module``. It is scored in the mode it is in (``model.eval()`` for
            eval-mode BatchNorm; in train mode BN is scale-invariant per channel, so conv
            output-channel ``oba`` scores before a train-mode BN vanish, SPEC §7.3). The model
            is not modified: parameters and buffers (BN running stats) are as before.
        batches: iterable of ``(inputs, targets)``; ``inputs`` a tensor or a tuple of tensors
            passed as ``model(*inputs)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; default mean cross-entropy.
        kind: a criterion of :mod:`oba_ext.criteria` ("oba", "exact", "taylor", ...).
        granularity: any of "out", "in", "weight", "head".
        targets / ignore: qualified module names to score / to leave out.
        max_batches: stop after this many batches.
        impl: "reference" (exact autograd oracles), "kernel" (the two-stream engine) or
            "auto" (the engine when the model can be captured, else the reference path).
        device / dtype: score a copy of the model on this device / in this dtype
            (``dtype=torch.float64`` for reference-grade numbers).
        progress: show a tqdm bar over batches.
        keep_per_batch: also keep each batch's scores in ``LayerScores.per_batch``.
        checkpoint: path of a score-state file, saved atomically every ``checkpoint_every``
            batches and at the end; when it exists, scoring resumes after the batches it holds
            (the first ``num_batches`` items of ``batches`` are skipped), with identical results.
        distributed: all-reduce the accumulated sums over ``torch.distributed`` (default: when
            a process group is initialized with more than one rank). Each rank passes its own
            shard of batches; the result is the average over all ranks' batches.
        direction: ``{target parameter name: tensor}`` (missing names = 0): score
            ``v ⊙ Hv`` / ``v ⊙ Ĥv`` along ``v`` instead of ``θ ⊙ Hθ`` (kinds "exact"/"oba";
            README "Curvature products").
        criterion_options: the criterion's own parameters, e.g. ``{"num_samples": 32,
            "seed": 1, "weighted": True}`` for "hessian_trace" (``CRITERIA[kind].options``
            lists them with their defaults; ``ValueError`` for an unknown one).

    Returns: a :class:`ScoreResult` mapping layer names to :class:`LayerScores`, averaged over
        batches (per-batch sums of SPEC §2/§5, signed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    crit = _criteria.get(kind)
    opts = _criteria.resolve_options(crit, criterion_options)
    if direction is not None and not crit.directional:
        raise ValueError(f"direction: kind {crit.name!r} does not move along a direction; "
                         f"use one of {sorted(n for n, c in _criteria.CRITERIA.items() if c.directional)}")
    gran = _normalize_granularity(granularity)
    if impl not in _IMPLS:
        raise ValueError(f"impl: expected one of {list(_IMPLS)}, got {impl!r}")
    if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches: expected a positive int or None, got {max_batches!r}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every: expected >= 1, got {checkpoint_every}")
    if loss_fn is None:
        loss_fn = default_loss
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (outputs, targets) -> scalar, got "
                        f"{type(loss_fn).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")

    model_device = _check_devices(model)
    if device is not None or dtype is not None:
        dev = torch.device(device) if device is not None else model_device
        cur_dtype = next(model.parameters()).dtype if any(True for _ in model.parameters()) else None
        if dev != model_device or (dtype is not None and dtype != cur_dtype):
            model = copy.deepcopy(model).to(device=dev, dtype=dtype)
        model_device = dev
    layers = find_layers(model, targets, ignore, include_norm=crit.norm_layers)
    loss = checked_loss(loss_fn)
    keys = _keys_for(gran)
    curvature = direction is not None or crit.batch is not None
    if direction is not None:
        from .curvature import check_direction
        from .targets import target_parameters
        direction = check_direction(target_parameters(layers), direction, "direction")

    if distributed is None:
        distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()
                       and torch.distributed.get_world_size(process_group) > 1)

    acc = _Accumulator(keep_per_batch)
    meta = {"version": _CKPT_VERSION, "kind": crit.name, "granularity": gran,
            "layers": sorted(layers)}
    if opts:
        meta["options"] = opts
    if direction is not None:  # a fingerprint: names and sums of squares
        meta["direction"] = {n: float(t.double().square().sum()) for n, t in direction.items()}
    skip = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        st = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if st.get("meta") != meta:
            raise ValueError(f"checkpoint: {checkpoint!r} was written for a different run "
                             f"({st.get('meta')}); expected {meta}. Delete it or pass another path")
        acc.load_state_dict(st["acc"], model_device)
        skip = acc.num_batches

    state = _snapshot_buffers(model)
    scorer = None
    it = iter(batches)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = max_batches
        if hasattr(batches, "__len__"):
            total = min(len(batches), max_batches) if max_batches else len(batches)
        bar = tqdm(total=total, desc=f"oba_ext.score[{crit.name}]", unit="batch",
                   initial=skip, dynamic_ncols=True)
    seen = 0
    try:
        for index, batch in enumerate(it):
            if max_batches is not None and index >= max_batches:
                break
            seen += 1
            if index < skip:
                continue
            inputs, tgt = _split_batch(batch, index)
            inputs = _to(inputs, model_device, dtype)
            tgt = _to(tgt, model_device, dtype)
            if scorer is None:
                if curvature:  # the direction protocol (oba_ext/curvature.py)
                    from .curvature import make_curvature_scorer
                    scorer = make_curvature_scorer(model, layers, loss, impl, (inputs, tgt), crit)
                else:
                    scorer = _make_scorer(model, layers, loss, impl, crit, (inputs, tgt))
            with torch.enable_grad():  # callers may hold no_grad (Torch-Pruning's pruners do)
                if crit.batch is not None:
                    q = crit.batch(scorer, inputs, tgt, keys, opts, index)
                elif direction is not None:
                    q = scorer(inputs, tgt, crit.quantities, keys, direction=direction)
                else:
                    q = scorer(inputs, tgt, crit.quantities, keys)
            acc.add(_apply_criterion(crit, q), index,
                    weight=_batch_size(inputs) if crit.per_sample_mean else 1.0)
            _restore_buffers(model, state)
            if bar is not None:
                bar.update(1)
            if checkpoint is not None and acc.num_batches % checkpoint_every == 0:
                _save_atomic({"meta": meta, "acc": acc.state_dict()}, checkpoint)
    finally:
        _restore_buffers(model, state)
        if bar is not None:
            bar.close()
    if seen == 0:
        raise ValueError("batches: the iterable yielded no batch (nothing to score)")
    if checkpoint is not None:
        _save_atomic({"meta": meta, "acc": acc.state_dict()}, checkpoint)

    num, total = acc.num_batches, acc.total_weight
    if distributed:
        num, total = _all_reduce(acc, process_group, model_device, layers)
    impl_ran = getattr(scorer, "impl", "reference") if scorer is not None else "reference"
    return _finish(acc, num, total, layers, crit, gran, impl_ran, model)


def _batch_size(inputs) -> float:
    first = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise ValueError("batches: a per-sample-mean criterion needs inputs with a batch dimension")
    return float(first.shape[0])


def _keys_for(gran: Tuple[str, ...]) -> Tuple[str, ...]:
    from .heads import helper_keys  # "head" is formed from "out"/"in" (oba_ext/heads.py)
    keys = []
    for g in gran:
        keys += ["weight", "bias"] if g == "weight" else [g]
    return tuple(dict.fromkeys(keys + list(helper_keys(gran))))


def _apply_criterion(crit, q):
    """{layer: {quantity: {key: t}}} -> {layer: {key: per-batch criterion value}}."""
    out = {}
    for layer, by_q in q.items():
        keys = set.intersection(*(set(by_q[n]) for n in crit.quantities))
        out[layer] = {k: crit.per_batch({n: by_q[n][k] for n in crit.quantities}) for k in keys}
    return out


def _all_reduce(acc: _Accumulator, group, device, layers) -> Tuple[int, float]:
    import torch.distributed as dist
    for layer in sorted(acc.sums):
        for key in sorted(acc.sums[layer]):
            dist.all_reduce(acc.sums[layer][key], op=dist.ReduceOp.SUM, group=group)
    n = torch.tensor([acc.num_batches, acc.total_weight], dtype=torch.float64, device=device)
    dist.all_reduce(n, op=dist.ReduceOp.SUM, group=group)
    return int(n[0].item()), float(n[1].item())


def _finish(acc, num, total, layers, crit, gran, impl_ran, model) -> ScoreResult:
    out = {}
    fields = {"out": "out", "in": "inp", "weight": "weight", "bias": "bias", "head": "head"}
    by_layer = {name: acc.sums.get(name, {}) for name in layers}
    if "head" in gran:  # per-head sums of channel scores, under attention modules' names
        from .heads import add_head_scores
        by_layer = add_head_scores(model, layers, by_layer, gran)
    modules = dict(model.named_modules())
    for name, sums in by_layer.items():
        ref = (layers[name].param(layers[name].params[0]) if name in layers
               else next(modules[name].parameters()))
        ls = LayerScores()
        for key, s in sums.items():
            v = s / total
            if crit.finalize is not None:
                v = crit.finalize(v)
            v = v.to(ref.dtype)
            if key.startswith("parts."):
                ls.parts[key[len("parts."):]] = v
            else:
                setattr(ls, fields[key], v)
        if acc.keep:
            ls.per_batch = acc.per_batch.get(name, {})
        out[name] = ls
    return ScoreResult(out, kind=crit.name, granularity=gran, num_batches=num, impl=impl_ran)


def _snapshot_buffers(model: nn.Module):
    return [(b, b.detach().clone()) for b in model.buffers()]


def _restore_buffers(model: nn.Module, state):
    with torch.no_grad():
        for b, saved in state:
            b.copy_(saved)
