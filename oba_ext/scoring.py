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

import contextlib
import itertools
import os
import warnings
from collections.abc import Mapping
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from . import criteria as _criteria
from . import model_prep as _prep
from . import inputs as _inputs
from . import engine
from .heads import add_head_scores, helper_keys
from .errors import EmptyBatchError, RefusedError
from .losses import checked_loss, default_loss  # noqa: F401  (re-exported: public names)
from .reference import ReferenceScorer
from .reference.oracles import module_generators
from .results import GRANULARITIES, LayerScores, ScoreResult
from .targets import LayerSpec, find_layers, target_parameters

_IMPLS = ("auto", "reference", "kernel")
_CKPT_VERSION = 3  # 2: total_weight (per-sample-mean criteria); 3: sha256 fingerprints


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




def _to(x, device, dtype):
    """Move the tensors of a batch (a tensor, tuple/list, or dict/Mapping of keyword inputs,
    nested) to ``device``; floating tensors also to ``dtype``. A Mapping (e.g. Hugging Face's
    ``BatchEncoding``) becomes a plain dict."""
    if isinstance(x, torch.Tensor):
        if dtype is not None and x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)
    if isinstance(x, tuple) and hasattr(x, "_fields"):  # namedtuple
        return type(x)(*(_to(v, device, dtype) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device, dtype) for v in x)
    if isinstance(x, Mapping):
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
    if impl == "reference" or "kernel" not in crit.impls:
        if impl == "kernel":
            raise ValueError(f"impl: kind {crit.name!r} has no kernel implementation; "
                             f"use impl='reference' or 'auto'")
        return ReferenceScorer(model, layers, loss_fn)
    try:
        return engine.build_scorer(model, layers, loss_fn, example, quantities=crit.quantities)
    except engine.CaptureError as e:
        if impl == "kernel":
            raise _kernel_error(e)(f"impl='kernel': the model cannot be captured: {e}") from e
        warnings.warn(f"oba_ext.score: cannot capture {type(model).__name__} for the fast "
                      f"engine ({e}); falling back to the reference path", stacklevel=3)
        return ReferenceScorer(model, layers, loss_fn)


def check_recompute(recompute) -> None:
    """``TypeError`` unless ``recompute`` is a bool (``"no"`` would read as True)."""
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute: expected True or False, got {recompute!r}")


def set_recompute(scorer) -> None:
    """Turn on ``recompute`` (activation checkpointing, :func:`score`) on an engine scorer;
    warn once when ``scorer`` is the reference path, which has no such mode."""
    if getattr(scorer, "impl", "reference") == "kernel":
        scorer.recompute = True
    else:
        warnings.warn("oba_ext: recompute=True applies to the engine (impl='kernel'); this "
                      "kind or model runs on the reference path, which ignores it", stacklevel=3)


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
        _check_finite(values, batch_index)
        for layer, d in values.items():
            for key, v in d.items():
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


def _check_finite(values: Dict[str, Dict[str, torch.Tensor]], batch_index: int) -> None:
    """Raise ``FloatingPointError`` naming the layer, key and batch of the first NaN/Inf score.
    One host sync per batch: the per-tensor flags are reduced on the device and read once; only
    when one is bad are the tensors searched (the error path)."""
    items = [(layer, key, v) for layer, d in values.items() for key, v in d.items()]
    if not items:
        return
    by_dev: Dict[torch.device, list] = {}
    for _, _, v in items:
        by_dev.setdefault(v.device, []).append(torch.isfinite(v).all())
    flags = [torch.stack(f).all() for f in by_dev.values()]
    ok = flags[0] if len(flags) == 1 else torch.stack([f.cpu() for f in flags]).all()
    if bool(ok):  # the one sync
        return
    for layer, key, v in items:
        if not torch.isfinite(v).all():
            bad = "NaN" if torch.isnan(v).any() else "Inf"
            raise FloatingPointError(
                f"score: {bad} in the {key!r} score of layer {layer!r} at batch "
                f"{batch_index}; check the inputs, the loss and the model for overflow "
                f"(scoring in float64 with dtype=torch.float64 may help)")


def _save_atomic(obj, path: str):
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def score(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable] = None, kind: str = "oba",
          *,
          # what is scored
          granularity: Union[str, Sequence[str]] = ("out", "in"),
          targets: Optional[Iterable[str]] = None, ignore: Iterable = (),
          direction=None, criterion_options=None,
          # where and how it runs
          max_batches: Optional[int] = None, impl: str = "auto",
          device=None, dtype: Optional[torch.dtype] = None,
          progress: bool = True, keep_per_batch: bool = False, recompute: bool = False,
          checkpoint: Optional[str] = None, checkpoint_every: int = 10,
          distributed: Optional[bool] = None, process_group=None) -> ScoreResult:
    """Score the target layers of ``model`` over ``batches``.

    Arguments after ``kind`` are keyword-only. They come in two groups: what is scored
    (the mathematics) and where and how it runs (operations); the simple call is
    ``score(model, batches)``.

    Args (what is scored):
        model: any ``nn.Module``. It is scored in the mode it is in (``model.eval()`` for
            eval-mode BatchNorm; in train mode BN is scale-invariant per channel, so conv
            output-channel ``oba`` scores before a train-mode BN vanish, SPEC §7.3). The model
            is not modified: parameters and buffers (BN running stats) are as before.
            Wrappers are unwrapped and the module inside is scored (``torch.compile``'d modules
            via ``_orig_mod``, ``nn.DataParallel`` / ``DistributedDataParallel`` via
            ``.module``): result names are the inner module's (``"0"``, not ``"module.0"``);
            ``targets``/``ignore`` accept either form. Masked layers (``torch.nn.utils.prune``:
            ``weight = weight_orig ⊙ weight_mask``) are scored at their effective weight θ = the
            product: masked entries score 0 and are not moved (SPEC §8).
        batches: iterable of ``(inputs, targets)``; ``inputs`` is a tensor (``model(x)``), a
            tuple/list of positional inputs (``model(*inputs)``) or a dict of keyword inputs
            (``model(**inputs)``, e.g. ``{"input_ids": ids, "attention_mask": mask}`` for a
            Hugging Face model; see :mod:`oba_ext.inputs`). Tensors are moved to the model's
            device (floating ones to ``dtype``). Per-sample-mean criteria take the batch size
            from dim 0 of the first tensor. An empty batch raises
            :class:`oba_ext.EmptyBatchError` (a ``ValueError``) naming its index and what is
            empty (SPEC §8): a first input tensor with a zero-size dimension (0 samples, or
            ``(B, 0)`` tokens), a targets tensor with no element, or a loss that averaged over
            zero elements (NaN for finite model outputs: length-1 sequences under a next-token
            loss, every target ``ignore_index``). Other empty input tensors are allowed.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; default mean cross-entropy (on
            ``outputs.logits`` when the model returns an object with a ``logits`` field, such
            as a Hugging Face ``ModelOutput``; a language model's ``(B, N, V)`` logits need
            their own ``loss_fn``, e.g. ``lambda o, y: F.cross_entropy(o.logits.flatten(0, 1),
            y.flatten())``).
        kind: a criterion of :mod:`oba_ext.criteria` ("oba", "exact", "taylor", ...).
        granularity: any of "out", "in", "weight", "head".
        targets / ignore: qualified module names to score / to leave out.
        direction: ``{target parameter name: tensor}`` (missing names = 0): score
            ``v ⊙ Hv`` / ``v ⊙ Ĥv`` along ``v`` instead of ``θ ⊙ Hθ`` (kinds "exact"/"oba";
            README "Curvature products").
        criterion_options: the criterion's own parameters, e.g. ``{"num_samples": 32,
            "seed": 1, "weighted": True}`` for "hessian_trace" (``CRITERIA[kind].options``
            lists them with their defaults; ``ValueError`` for an unknown one).

    Args (where and how it runs):
        max_batches: stop after this many batches.
        impl: "reference" (exact autograd oracles), "kernel" (the two-stream engine) or
            "auto" (the engine when the model can be captured, else the reference path).
        device / dtype: score a copy of the model on this device / in this dtype
            (``dtype=torch.float64`` for reference-grade numbers).
        progress: show a tqdm bar over batches.
        keep_per_batch: also keep each batch's scores in ``LayerScores.per_batch``.
        recompute: trade time for memory on the engine (activation checkpointing): the
            forward sweep keeps, for each of about √(steps) segments, only the values and
            tangents the segment reads, and the backward sweep recomputes the segment's
            forward — bitwise the same scores (dropout masks too), about one more two-stream
            forward in time. On torchvision's ViT (6×384, 65 tokens, batch 16, CPU) structured
            ``oba`` peaks at 0.58× a gradient's memory instead of 1.7×, and takes 2.32× a
            gradient's time instead of 1.60×. The reference path (autograd) ignores it, with
            a warning.
        checkpoint: path of a score-state file, saved atomically every ``checkpoint_every``
            batches and at the end; when it exists, scoring resumes after the batches it holds
            (the first ``num_batches`` items of ``batches`` are skipped), with identical results.
            A checkpoint of another run (kind, granularity, layers, options, or the sha256 of
            the direction or of the model's state differ) raises ``ValueError``.
        distributed: all-reduce the accumulated sums over ``torch.distributed`` (default: when
            a process group is initialized with more than one rank). Each rank passes its own
            shard of batches; the result is the average over all ranks' batches. Under NCCL
            each rank scores on ``cuda:LOCAL_RANK`` (``device="cuda"`` or a model on another
            GPU; an explicit ``cuda:i`` is kept). Before the sums are all-reduced the ranks
            agree (one all-reduce of a status flag) and, if any rank failed or got no batch,
            every rank raises (``ValueError`` naming the ranks without batches) instead of
            leaving the others waiting.
        process_group: the ``torch.distributed`` group to all-reduce over (default: the
            world group).

    Returns: a :class:`ScoreResult` mapping layer names to :class:`LayerScores`, averaged over
        batches (per-batch sums of SPEC §2/§5, signed).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    model, wrappers = _prep.unwrap(model)  # compile / DataParallel / DDP: score the inner module
    _prep.check_initialized(model)
    targets, ignore = _prep.strip_prefix(targets, wrappers), _prep.strip_prefix(ignore, wrappers)
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
    check_recompute(recompute)
    if loss_fn is None:
        loss_fn = default_loss
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (outputs, targets) -> scalar, got "
                        f"{type(loss_fn).__name__}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype: expected a floating torch.dtype, got {dtype!r}")

    if distributed is None:
        distributed = (torch.distributed.is_available() and torch.distributed.is_initialized()
                       and torch.distributed.get_world_size(process_group) > 1)
    model_device = _check_devices(model)
    backend = torch.distributed.get_backend(process_group) if distributed else None
    dev = _prep.rank_device(device, model_device,
                            backend, _prep.local_rank(process_group) if distributed else None)
    _prep.check_device_available(dev, "device")
    if dev is not None and dev.type == "cuda" and backend == "nccl":
        torch.cuda.set_device(dev)  # NCCL collectives run on the current device
    model = _prep.copy_to(model, dev, dtype)
    model_device = dev
    layers = find_layers(model, targets, ignore, include_norm=crit.norm_layers)
    loss = checked_loss(loss_fn)
    keys = _keys_for(gran)
    curvature = direction is not None or crit.batch is not None
    if direction is not None:
        from .curvature import check_direction  # scipy stays unloaded unless curvature is used
        direction = check_direction(target_parameters(layers), direction, "direction", model)

    acc = _Accumulator(keep_per_batch)
    meta = {"version": _CKPT_VERSION, "kind": crit.name, "granularity": gran,
            "layers": sorted(layers)}
    if opts:
        meta["options"] = opts
    if direction is not None:
        meta["direction"] = _fingerprint(direction)
    if checkpoint is not None:  # a resumed run must score the same function of the same θ
        meta["model"] = _fingerprint(model.state_dict(keep_vars=False))
    skip = 0
    resume_rng = None
    if checkpoint is not None and os.path.exists(checkpoint):
        st = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if st.get("meta") != meta:
            raise ValueError(f"checkpoint: {checkpoint!r} was written for a different run "
                             f"({st.get('meta')}); expected {meta}. Delete it or pass another path")
        acc.load_state_dict(st["acc"], model_device)
        skip = acc.num_batches
        resume_rng = st.get("rng")  # where the interrupted run's random state stood

    state = _snapshot_buffers(model)
    gens = module_generators(model)  # generators a forward may draw from (fallback replay)
    scorer = None
    it = iter(batches)
    bar = None
    if progress:
        total = max_batches
        if hasattr(batches, "__len__"):
            total = min(len(batches), max_batches) if max_batches else len(batches)
        bar = tqdm(total=total, desc=f"oba_ext.score[{crit.name}]", unit="batch",
                   initial=skip, dynamic_ncols=True)
    seen = 0
    failure = None
    masks = _prep.prepared(model)  # θ of a masked layer = weight_orig ⊙ weight_mask; eager compiled
    masks.__enter__()
    try:
        for index, batch in enumerate(it):
            if max_batches is not None and index >= max_batches:
                break
            seen += 1
            if index < skip:
                continue
            if resume_rng is not None:  # dropout draws the masks the uninterrupted run drew
                _prep.set_rng_state(resume_rng, gens)
                resume_rng = None
            inputs, tgt = _split_batch(batch, index)
            _check_not_empty(inputs, tgt, index)
            inputs = _to(inputs, model_device, dtype)
            tgt = _to(tgt, model_device, dtype)
            if scorer is None:
                if curvature:  # the direction protocol (oba_ext/curvature.py)
                    from .curvature import make_curvature_scorer  # scipy: only when used
                    scorer = make_curvature_scorer(model, layers, loss, impl, (inputs, tgt), crit)
                else:
                    scorer = _make_scorer(model, layers, loss, impl, crit, (inputs, tgt))
                if recompute:
                    set_recompute(scorer)
            # the random state before the batch: a fallback below redraws the same masks
            rng = (_prep.rng_state(gens) if impl == "auto" and
                   getattr(scorer, "impl", "") == "kernel" else None)
            with torch.enable_grad(), _batch_context(index, inputs, tgt, model):
                # (enable_grad: callers may hold no_grad, as Torch-Pruning's pruners do)
                try:
                    q = _score_batch(scorer, crit, inputs, tgt, keys, opts, index, direction)
                except _engine_refusal() as e:
                    # the engine met something it cannot compute only at run time (e.g. an op
                    # refused in an oba pass, attention weights feeding the loss): under "auto"
                    # this batch and the rest run on the reference path, which gives the same
                    # numbers (SPEC §7); "kernel" raises, naming the reason
                    if impl != "auto" or getattr(scorer, "impl", "") != "kernel":
                        if impl == "kernel":
                            raise _kernel_error(e)(f"impl='kernel': {e}") from e
                        raise
                    warnings.warn(f"oba_ext.score: the fast engine cannot score "
                                  f"{type(model).__name__} ({e}); falling back to the reference "
                                  f"path from batch {index} on", stacklevel=2)
                    _restore_buffers(model, state)
                    _prep.set_rng_state(rng, gens)  # the engine drew this batch's masks
                    scorer = _reference_scorer(model, layers, loss, curvature)
                    q = _score_batch(scorer, crit, inputs, tgt, keys, opts, index, direction)
            acc.add(_apply_criterion(crit, q), index,
                    weight=_batch_size(inputs) if crit.per_sample_mean else 1.0)
            _restore_buffers(model, state)
            if bar is not None:
                bar.update(1)
            if checkpoint is not None and acc.num_batches % checkpoint_every == 0:
                _save_atomic({"meta": meta, "acc": acc.state_dict(),
                              "rng": _prep.rng_state(gens)}, checkpoint)
    except Exception as e:
        if not distributed:
            raise
        failure = e  # the other ranks must hear of it before anyone raises (no hang)
    finally:
        _restore_buffers(model, state)
        if bar is not None:
            bar.close()
        masks.__exit__(None, None, None)
    if distributed:
        _agree(failure, seen, process_group, model_device)
    if seen == 0:
        raise ValueError("batches: the iterable yielded no batch (nothing to score)")
    if checkpoint is not None:
        _save_atomic({"meta": meta, "acc": acc.state_dict(), "rng": _prep.rng_state(gens)},
                     checkpoint)

    num, total = acc.num_batches, acc.total_weight
    if distributed:
        num, total = _all_reduce(acc, process_group, model_device, layers)
    impl_ran = getattr(scorer, "impl", "reference") if scorer is not None else "reference"
    return _finish(acc, num, total, layers, crit, gran, impl_ran, model)


@contextlib.contextmanager
def _batch_context(index, inputs, tgt, model, caller="oba_ext.score"):
    """Any error raised while ``caller`` handles a batch (the model's own forward, the loss, a
    kernel) keeps its type and message and gains a note (PEP 678 ``__notes__``, printed with the
    traceback from Python 3.11) naming the batch, its inputs and targets, and the model's
    dtype: a shape or dtype mismatch in user data is then attributable without a debugger."""
    try:
        yield
    except Exception as e:
        if isinstance(e, EmptyBatchError) and not str(e).startswith("batches: batch"):
            # raised by the loss, which does not know the batch: name it
            sep = " is empty: " if getattr(e, "whole_batch", True) else ": "
            e.args = (f"batches: batch {index}{sep}{e}",) + e.args[1:]
        note = _describe_batch(index, inputs, tgt, model, caller)
        if hasattr(e, "add_note"):
            e.add_note(note)
        else:  # Python < 3.11: the attribute alone (tracebacks do not print it there)
            e.__notes__ = list(getattr(e, "__notes__", [])) + [note]
        raise


def _tensors_brief(x) -> str:
    """"(6, 4) float64, (6,) int64": shapes and dtypes of the tensors in ``x`` (first four)."""
    ts = [t for t in pytree.tree_leaves(x) if isinstance(t, torch.Tensor)]
    parts = [f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}" for t in ts[:4]]
    return ", ".join(parts + (["…"] if len(ts) > 4 else [])) or type(x).__name__


def _describe_batch(index, inputs, tgt, model, caller="oba_ext.score") -> str:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    mdt = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes)) or "no floating"
    floats = {t.dtype for t in pytree.tree_leaves(inputs)
              if isinstance(t, torch.Tensor) and t.is_floating_point()}
    hint = ""
    if floats and dtypes and not floats <= dtypes:
        hint = (" (floating inputs and parameters differ in dtype: cast the batch, or pass "
                "dtype= to score a copy of the model in the batch's dtype)")
    return (f"{caller}: while scoring batch {index}: inputs {_tensors_brief(inputs)}; "
            f"targets {_tensors_brief(tgt)}; model parameters {mdt}{hint}")


def _fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the names, dtypes, shapes and values of ``tensors`` (a checkpoint's identity
    for a direction or a model's state: any change of a value changes it)."""
    import hashlib
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _kernel_error(e) -> type:
    """The class ``impl="kernel"`` raises for the engine's ``CaptureError`` ``e``:
    :class:`~oba_ext.errors.RefusedError` when every path refuses its cause (the reference path
    raises the same class), else ``RuntimeError`` (the engine alone cannot; ``"auto"`` falls
    back to the reference path)."""
    return RefusedError if getattr(e, "refused", False) else RuntimeError


def _engine_refusal():
    from .engine import CaptureError
    return CaptureError


def _reference_scorer(model, layers, loss, curvature: bool):
    if curvature:  # as make_curvature_scorer builds it: a direction moves masked weights by 0
        from .reference.hvp import ReferenceCurvature
        sc = ReferenceCurvature(model, layers, loss)
        masks = _prep.parameter_masks(layers)
        return _prep.MaskedDirections(sc, masks) if masks else sc
    from .reference import ReferenceScorer
    return ReferenceScorer(model, layers, loss)


def _score_batch(scorer, crit, inputs, tgt, keys, opts, index, direction):
    """One batch through ``scorer``: the criterion's own batch function, a direction, or the
    plain quantities (the per-batch protocol in the module docstring)."""
    if crit.batch is not None:
        return crit.batch(scorer, inputs, tgt, keys, opts, index)
    if direction is not None:
        return scorer(inputs, tgt, crit.quantities, keys, direction=direction)
    return scorer(inputs, tgt, crit.quantities, keys)


def _check_not_empty(inputs, tgt, index: int) -> None:
    """:class:`~oba_ext.losses.EmptyBatchError` for an empty batch, which would count as a batch
    and shift every average (SPEC §8). Empty means: the first input tensor (the one that carries
    the samples, see :func:`oba_ext.inputs.batch_size`) has a zero-size dimension (0 samples, or
    ``(B, 0)`` tokens), or the targets are one tensor with no element. Other input tensors may
    be empty (an empty cache or mask, a zero-width feature block); a batch they leave with
    nothing to average over is caught by the loss (:func:`oba_ext.losses.check_loss_not_empty`),
    as is a loss that skips every target."""
    leaves, _ = pytree.tree_flatten_with_path(inputs)
    first = next(((path, t) for path, t in leaves if isinstance(t, torch.Tensor) and t.dim() > 0),
                 None)
    checks = []
    if first is not None:
        checks.append(("inputs" + pytree.keystr(first[0]), first[1]))
    if isinstance(tgt, torch.Tensor) and tgt.dim() > 0:
        checks.append(("targets", tgt))
    for what, t in checks:
        if t.numel() == 0:
            dims = [d for d, n in enumerate(t.shape) if n == 0]
            which = ("0 samples" if dims[0] == 0 else
                     f"dimension {dims[0]} has size 0")
            raise EmptyBatchError(f"batches: batch {index} is empty ({what} of shape "
                                  f"{tuple(t.shape)}: {which}); drop empty batches before "
                                  f"scoring (SPEC §8)")


def _agree(failure: Optional[BaseException], seen: int, group, device) -> None:
    """All ranks learn which ranks failed or had no batch (one all-reduce), then all raise
    together: a rank that raised alone would leave the others waiting in the sums' all-reduce."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    status = torch.zeros(world, 2, dtype=torch.float64, device=device)
    status[rank, 0] = float(failure is not None)
    status[rank, 1] = float(seen == 0 and failure is None)
    dist.all_reduce(status, op=dist.ReduceOp.SUM, group=group)
    failed = [r for r in range(world) if status[r, 0].item() > 0]
    empty = [r for r in range(world) if status[r, 1].item() > 0]
    if failure is not None:
        raise failure
    if failed:
        raise RuntimeError(f"score: rank(s) {failed} of {world} failed while scoring (their own "
                           f"error says why); no scores were all-reduced")
    if empty:
        raise ValueError(f"batches: rank(s) {empty} of {world} got no batch; under "
                         f"torch.distributed every rank needs at least one batch (e.g. "
                         f"batches[rank::world_size] with at least world_size batches)")


def _batch_size(inputs) -> float:
    """Samples in a batch: dim 0 of the first tensor of ``inputs`` (see :mod:`oba_ext.inputs`)."""
    return float(_inputs.batch_size(inputs))


def _keys_for(gran: Tuple[str, ...]) -> Tuple[str, ...]:
    # "head" is formed from "out"/"in" (oba_ext/heads.py)
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
