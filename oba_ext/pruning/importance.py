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
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

import torch_pruning as tp
from torch_pruning.pruner import function as F

from .. import criteria as _criteria


def _take(s: torch.Tensor, idxs, layer: nn.Module, what: str) -> torch.Tensor:
    if len(idxs) and max(idxs) >= s.numel():
        raise ValueError(f"OBAImportance: {what} scores of {layer} have {s.numel()} entries but "
                         f"Torch-Pruning indexes up to {max(idxs)} (scores of another model?)")
    return s[idxs]


def _out(layer: nn.Module, ls, idxs) -> List[torch.Tensor]:
    """Output channels removed: rows of W (and their bias) -> ``ls.out``: (C_out,)."""
    return [] if ls.out is None else [_take(ls.out, idxs, layer, "output-channel")]


def _depthwise(layer: nn.Module, ls, idxs) -> List[torch.Tensor]:
    """Torch-Pruning's depthwise handler serves both sides (in- and out-pruning are one
    function); a conv with groups == C_out < C_in is typed depthwise too, and then its idxs
    count input channels: use ``ls.inp`` when the idxs do not fit ``ls.out``."""
    if ls.out is not None and (not len(idxs) or max(idxs) < ls.out.numel()):
        return [ls.out[idxs]]
    return _inp(layer, ls, idxs)


def _inp(layer: nn.Module, ls, idxs) -> List[torch.Tensor]:
    """Input channels removed: columns of W -> ``ls.inp``: (C_in,). A grouped conv whose
    input score has C_in/groups entries (per weight column) is tiled over the groups, the
    way Torch-Pruning indexes grouped-conv inputs."""
    if ls.inp is None:
        return []
    s = ls.inp
    c_in = getattr(layer, "in_channels", getattr(layer, "in_features", s.numel()))
    groups = getattr(layer, "groups", 1)
    if s.numel() != c_in and groups > 1 and s.numel() * groups == c_in:
        s = s.repeat(groups)
    return [_take(s, idxs, layer, "input-channel")]


def _mha_embed(layer: nn.Module, ls, idxs, scores=None, names=None) -> List[torch.Tensor]:
    """``nn.MultiheadAttention`` embed-dim pruning (Torch-Pruning removes index e from the
    in_proj columns, the q/k/v rows e, E+e, 2E+e, and out_proj's row and column e): the sum of
    every available score of those pieces."""
    E = layer.embed_dim
    idxs_t = torch.as_tensor(idxs, dtype=torch.long)
    parts = []
    if ls is not None:
        if ls.inp is not None and ls.inp.numel() == E:
            parts.append(ls.inp[idxs_t])
        if ls.out is not None and ls.out.numel() == 3 * E:
            parts += [ls.out[idxs_t + k * E] for k in range(3)]
    op = scores.get(names.get(layer.out_proj)) if scores is not None else None
    if op is not None:
        parts += [t[idxs_t] for t in (op.out, op.inp) if t is not None and t.numel() == E]
    return parts


#: Torch-Pruning pruning function -> which scores of the target layer measure it.
#: (prune_*_in_channels of depthwise convs and of MHA are the same functions as *_out_*.)
HANDLERS: Dict[Callable, Callable] = {
    F.prune_conv_out_channels: _out,
    F.prune_linear_out_channels: _out,
    F.prune_depthwise_conv_out_channels: _depthwise,
    F.prune_conv_in_channels: _inp,
    F.prune_linear_in_channels: _inp,
    # norm channels carry scores only for criteria that score them (e.g. the Jacobian Criterion)
    F.prune_batchnorm_out_channels: _out,
    F.prune_layernorm_out_channels: _out,
    F.prune_groupnorm_out_channels: _out,
}
#: handlers that need the whole score table (composite modules)
COMPOSITE_HANDLERS: Dict[Callable, Callable] = {
    F.prune_multihead_attention_out_channels: _mha_embed,
}


def _fingerprint(model: nn.Module) -> Tuple:
    """Names, shapes and a cheap value checksum of every parameter and buffer: equal for a
    deep copy, different after pruning or an optimizer step."""
    items = []
    with torch.no_grad():
        for n, t in list(model.named_parameters()) + list(model.named_buffers()):
            if t.is_floating_point() and t.numel():
                d = t.detach().double()
                items.append((n, tuple(t.shape), float(d.sum()), float(d.abs().sum())))
            else:
                items.append((n, tuple(t.shape)))
    return tuple(items)


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
        group_reduction / normalizer: as in ``tp.importance.GroupMagnitudeImportance``.
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
        reductions = ("mean", "sum", "max", "prod", "first", "gate", None)
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
        self._cache: Dict[Tuple, object] = {}   # fingerprint -> ScoreResult
        self._dg_key: Dict[int, Tuple] = {}     # id(DG) -> (shape signature, fingerprint)

    def reset(self) -> None:
        """Forget cached scores (the next group is scored afresh)."""
        self._cache.clear()
        self._dg_key.clear()

    def scores_for(self, model: nn.Module):
        """The :class:`ScoreResult` of ``model`` in its current state (cached)."""
        fp = _fingerprint(model)
        res = self._cache.get(fp)
        if res is None:
            score_fn = self.score_fn
            if score_fn is None:
                from ..scoring import score as score_fn
            # MetaPruner estimates importance under torch.no_grad(); scoring needs autograd
            with _mode(model, self.eval_mode), torch.enable_grad():
                res = score_fn(model, self.batches, loss_fn=self.loss_fn, kind=self.kind,
                               granularity=("out", "in"), **self.score_kwargs)
            self.num_scorings += 1
            self._cache = {fp: res}  # only the current model's scores are worth keeping
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

    def _result_for_group(self, group):
        model = self._model_of(group)
        dg = getattr(group, "_DG", None)
        # cheap per-call key: names, shapes and autograd version counters (bumped by every
        # in-place update, e.g. an optimizer step); the value fingerprint only when it changes
        shapes = tuple((n, tuple(p.shape), p._version) for n, p in model.named_parameters())
        key = self._dg_key.get(id(dg))
        if key is not None and key[0] == shapes and key[1] in self._cache:
            return model, self._cache[key[1]]
        res = self.scores_for(model)
        self._dg_key = {id(dg): (shapes, next(iter(self._cache)))}
        return model, res

    @torch.no_grad()
    def __call__(self, group, **kwargs):
        model, res = self._result_for_group(group)
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
            if fn in COMPOSITE_HANDLERS:
                parts = COMPOSITE_HANDLERS[fn](layer, res.layers.get(names.get(layer)), idxs,
                                              res.layers, names)
            elif fn in HANDLERS:
                ls = res.layers.get(names.get(layer))
                parts = [] if ls is None else HANDLERS[fn](layer, ls, idxs)
            else:
                continue  # parameters, embeddings, ...: not scored
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
