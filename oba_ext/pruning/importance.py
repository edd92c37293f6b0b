"""Torch-Pruning importance fed by :func:`oba_ext.score`.

:class:`OBAImportance` turns per-channel scores of the current model into the per-channel
importance of a Torch-Pruning dependency group (OBA paper's recipe):

    imp_c = normalize( reduce_{dep in group} | s_dep[idx_dep(c)] | )

where ``s_dep`` is the batch-averaged score of the layer ``dep.target.module`` at the side the
dependency prunes: output-channel scores (``LayerScores.out``) for layers whose outputs are
removed, input-channel scores (``LayerScores.inp``) for consumers whose inputs are removed.
``reduce`` ("mean", "sum", "max", "prod", "first", "gate") and ``normalize`` ("mean", "sum",
"max", "standarization", "gaussian", "lamp", "sentinel_q", None or a callable) follow
``tp.importance.GroupMagnitudeImportance`` exactly (inherited).

Scores are recomputed whenever the model changes (its parameter names, shapes or values), so
iterative schedules score the current model at every step; deep copies of an unchanged model
(as used by the FLOPs-target search) reuse the cached scores.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
from torch import nn

import torch_pruning as tp
from torch_pruning.pruner import function as F

from .. import criteria as _criteria
from .. import scoring as _scoring
from ..layers import kind_of


def _handler_table(kind) -> Dict[Callable, Callable]:
    """Torch-Pruning pruning function -> handler, from the kind's ``tp_handlers`` (names in
    ``torch_pruning.pruner.function``; a name this Torch-Pruning version lacks is skipped)."""
    table = _HANDLER_TABLES.get(kind.name)
    if table is None:
        table = {getattr(F, n): h for n, h in kind.tp_handlers.items() if hasattr(F, n)}
        _HANDLER_TABLES[kind.name] = table
    return table


_HANDLER_TABLES: Dict[str, Dict[Callable, Callable]] = {}


def handler_for(layer: nn.Module, fn: Callable) -> Optional[Callable]:
    """The handler measuring Torch-Pruning's ``fn`` applied to ``layer`` (its layer kind's
    ``tp_handlers``, :mod:`oba_ext.layers`), or None when the layer or that side is not scored."""
    kind = kind_of(layer)
    return None if kind is None else _handler_table(kind).get(fn)


class _Snapshot:
    """The exact state of a model's parameters and buffers (names, shapes, values), to tell
    whether cached scores still describe a model. Equal for a deep copy of an unchanged
    model; different after pruning, an optimizer step or any other in-place change.

    Fast check: the same tensor objects at the same autograd version counter and storage
    (bumped by every in-place update); otherwise an exact value comparison (``torch.equal``),
    so no two different states compare equal."""

    def __init__(self, model: nn.Module):
        self.tensors = self._tensors(model)
        self.values = [(n, t.detach().clone()) for n, t in self.tensors]
        self.stamp = self._stamp(self.tensors)

    @staticmethod
    def _tensors(model):
        return list(model.named_parameters()) + list(model.named_buffers())

    @staticmethod
    def _stamp(tensors):
        return [(n, id(t), t._version, t.data_ptr(), tuple(t.shape)) for n, t in tensors]

    def matches(self, model: nn.Module) -> bool:
        tensors = self._tensors(model)
        if self._stamp(tensors) == self.stamp:
            return True
        if [(n, tuple(t.shape), t.dtype) for n, t in tensors] != \
                [(n, tuple(v.shape), v.dtype) for n, v in self.values]:
            return False
        with torch.no_grad():
            same = all(torch.equal(t.detach().to(v.device), v)
                       for (_, t), (_, v) in zip(tensors, self.values))
        if same:  # an identical copy: next time the cheap stamp suffices
            self.tensors, self.stamp = tensors, self._stamp(tensors)
        return same


def _max_eps(imp: torch.Tensor) -> torch.Tensor:
    """The OBA authors' normalizer: ``imp / (max(imp) + 1e-6)``."""
    return imp / (imp.max() + 1e-6)


#: named recipes for :meth:`OBAImportance.from_preset`. "paper": the OBA authors' pipeline
#: (train-mode scoring, their group mean over layers with a non-zero score, max + 1e-6 normalizer).
PRESETS: Dict[str, dict] = {
    "paper": dict(kind="oba", eval_mode=False, group_reduction="mean_nonzero",
                  normalizer="max_eps"),
}


@contextlib.contextmanager
def _mode(model: nn.Module, eval_mode: Optional[bool]):
    if eval_mode is None:
        yield
        return
    modes = {m: m.training for m in model.modules()}
    model.train(not eval_mode)
    try:
        yield
    finally:
        for m, t in modes.items():
            m.training = t


class OBAImportance(tp.importance.GroupMagnitudeImportance):
    """Group importance from :func:`oba_ext.score` (any criterion of ``oba_ext.CRITERIA``).

    Args:
        kind: criterion name ("oba" default, "taylor", "exact", ...; see ``oba_ext.CRITERIA``).
        batches: iterable of ``(inputs, targets)`` used to score; re-iterated at every rescore,
            so pass a list or a DataLoader, not a one-shot generator.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (default mean cross-entropy).
        group_reduction / normalizer: as in ``tp.importance.GroupMagnitudeImportance``, plus
            ``group_reduction="mean_nonzero"`` (the mean over the group's layers whose scores
            are not all zero) and ``normalizer="max_eps"`` (divide by max + 1e-6), the OBA
            authors' two choices (see :data:`PRESETS` and :meth:`from_preset`).
        model: the model; by default taken from the group's dependency graph.
        eval_mode: score in eval mode (True, default: BN uses running stats, so conv
            output-channel scores before BN do not vanish, SPEC §7.3), in train mode (False),
            or in whatever mode the model is in (None).
        max_batches, impl, device, dtype, progress: passed to ``oba_ext.score``.
        score_fn: the scoring function (default ``oba_ext.score``); same signature.
        score_kwargs: extra keyword arguments for ``score_fn``.

    ``imp = OBAImportance(...)(group)`` is a (len(group idxs),) float32 tensor; ``None`` for a
    group without any scored layer. ``last_result`` holds the latest ScoreResult.
    """

    def __init__(self, kind: str = "oba", batches: Optional[Iterable] = None,
                 loss_fn: Optional[Callable] = None, group_reduction: str = "mean",
                 normalizer="mean", model: Optional[nn.Module] = None,
                 eval_mode: Optional[bool] = True, max_batches: Optional[int] = None,
                 impl: str = "auto", device=None, dtype=None, progress: bool = False,
                 score_fn: Optional[Callable] = None, score_kwargs: Optional[dict] = None):
        super().__init__(p=1, group_reduction=group_reduction, normalizer=normalizer, bias=False)
        _criteria.get(kind)  # ValueError naming the known kinds
        if batches is None:
            raise ValueError("batches: OBAImportance needs an iterable of (inputs, targets) to score on")
        if isinstance(batches, (map, filter, zip)) or (hasattr(batches, "__next__")
                                                        and iter(batches) is batches):
            raise TypeError("batches: got a one-shot iterator; pass a list or a DataLoader "
                            "(scores are recomputed at every pruning step)")
        reductions = ("mean", "sum", "max", "prod", "first", "gate", "mean_nonzero", None)
        if group_reduction not in reductions:
            raise ValueError(f"group_reduction: expected one of {list(reductions)}, got {group_reduction!r}")
        self.kind = kind
        self.batches = batches
        self.loss_fn = loss_fn
        self.model = model
        self.eval_mode = eval_mode
        self.score_kwargs = dict(max_batches=max_batches, impl=impl, device=device, dtype=dtype,
                                 progress=progress, **(score_kwargs or {}))
        self.score_fn = score_fn
        self.num_scorings = 0
        self.last_result = None
        self._cached: Optional[Tuple[_Snapshot, object]] = None  # (state scored, ScoreResult)

    @classmethod
    def from_preset(cls, name: str, batches: Iterable, **overrides) -> "OBAImportance":
        """An importance configured by a named recipe of :data:`PRESETS`; ``overrides``
        replace single arguments. ``OBAImportance.from_preset("paper", batches)`` is the
        OBA authors' pipeline: ``kind="oba"``, scored in train mode, ``group_reduction=
        "mean_nonzero"``, ``normalizer="max_eps"``. Raises ValueError for an unknown name."""
        if name not in PRESETS:
            raise ValueError(f"preset: unknown name {name!r}; expected one of {sorted(PRESETS)}")
        return cls(batches=batches, **{**PRESETS[name], **overrides})

    def _reduce(self, group_imp, group_idxs):
        if self.group_reduction != "mean_nonzero":
            return super()._reduce(group_imp, group_idxs)
        # the OBA authors' mean: the sum over the group's layers divided by the number of
        # layers whose score is not all zero (at least 1)
        total = torch.zeros_like(group_imp[0], dtype=torch.float32)
        n = 0
        for imp, root_idxs in zip(group_imp, group_idxs):
            if any(r is None for r in root_idxs):
                continue
            imp = imp.to(total.device, torch.float32)
            total.scatter_add_(0, torch.as_tensor(root_idxs, device=imp.device), imp)
            n += int(bool(imp.ne(0).any()))
        return total / max(n, 1)

    def _normalize(self, group_importance, normalizer):
        if normalizer == "max_eps":
            return _max_eps(group_importance)
        return super()._normalize(group_importance, normalizer)

    def reset(self) -> None:
        """Forget cached scores (the next group is scored afresh)."""
        self._cached = None

    def scores_for(self, model: nn.Module):
        """The :class:`ScoreResult` of ``model`` in its current state (cached: only the
        latest model's scores are kept, reused while its parameters and buffers are unchanged)."""
        res = None
        if self._cached is not None and self._cached[0].matches(model):
            res = self._cached[1]
        if res is None:
            score_fn = self.score_fn if self.score_fn is not None else _scoring.score
            # MetaPruner estimates importance under torch.no_grad(); scoring needs autograd
            with _mode(model, self.eval_mode), torch.enable_grad():
                res = score_fn(model, self.batches, loss_fn=self.loss_fn, kind=self.kind,
                               granularity=("out", "in"), **self.score_kwargs)
            self.num_scorings += 1
            self._cached = (_Snapshot(model), res)
        self.last_result = res
        return res

    def _model_of(self, group) -> nn.Module:
        if self.model is not None:
            dg_model = getattr(getattr(group, "_DG", None), "model", None)
            return dg_model if dg_model is not None else self.model
        dg = getattr(group, "_DG", None)
        if dg is None or getattr(dg, "model", None) is None:
            raise ValueError("OBAImportance: the group has no dependency graph; pass model=...")
        return dg.model

    @torch.no_grad()
    def __call__(self, group, **kwargs):
        model = self._model_of(group)
        res = self.scores_for(model)
        names = {m: n for n, m in model.named_modules()}
        group_imp, group_idxs = [], []
        seen = set()
        for i, (dep, idxs) in enumerate(group):
            layer, fn = dep.target.module, dep.handler
            root_idxs = group[i].root_idxs
            # a depthwise conv appears as in- and out-pruned with the same handler: count its
            # weights once
            if (id(layer), fn) in seen:
                continue
            seen.add((id(layer), fn))
            handler = handler_for(layer, fn)
            if handler is None:
                continue  # bare parameters, LSTMs, ...: not scored
            parts = handler(layer, res.layers.get(names.get(layer)), idxs, res.layers, names)
            for p in parts:
                group_imp.append(p.detach().abs().float())
                group_idxs.append(root_idxs)
        if not group_imp:
            return None
        imp = self._reduce(group_imp, group_idxs)
        if not bool(imp.ne(0).any()):
            # all scores zero (e.g. torchvision ViT's zero-initialised head blocks every
            # gradient): every channel ties; "mean"/"sum"/"max" would give 0/0 = NaN
            return imp
        return self._normalize(imp, self.normalizer)
