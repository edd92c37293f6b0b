"""Unstructured pruning from per-weight scores (``granularity="weight"``).

Masks keep the weights with the largest ``|s_i|`` (batch-averaged per-weight score, SPEC §5:
``W ⊙ (Gᵀ T + Cᵀ X)`` for ``oba``). The number of zeros is exact:
``round(sparsity · n)`` over all scored weights (``scope="global"``) or per layer
(``scope="layer"``); ties are broken by a stable sort, never by a threshold. Masks are applied
with ``torch.nn.utils.prune.custom_from_mask``; ``permanent=True`` calls ``prune.remove`` so
the zeros are baked into the parameter.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Optional

import torch
from torch import nn
from torch.nn.utils import prune


_SCOPES = ("global", "layer")


def _weight_param(module: nn.Module) -> str:
    """The name of the per-weight-scored parameter of a target layer ("weight", or
    "in_proj_weight" for a packed nn.MultiheadAttention)."""
    for name in ("weight", "in_proj_weight"):
        if isinstance(getattr(module, name, None), torch.Tensor):
            return name
    raise ValueError(f"{type(module).__name__} has no weight to mask")


def _lowest(scores: torch.Tensor, k: int, masked: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean mask (flat) of the k entries with the smallest |score|, stable in index order;
    entries already ``masked`` (flat bool) come first, so a later round never keeps them."""
    flat = scores.detach().abs().flatten().double()
    if masked is not None:
        flat = torch.where(masked.flatten().to(flat.device), torch.full_like(flat, -1.0), flat)
    order = torch.sort(flat, stable=True).indices
    pruned = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    pruned[order[:k]] = True
    return pruned


def _masked_entries(module: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """Bool tensor like ``s``: entries an earlier round masked (``<weight>_mask == 0``)."""
    mask = getattr(module, _weight_param(module) + "_mask", None)
    if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(s.shape):
        return (mask == 0).to(s.device)
    return torch.zeros(s.shape, dtype=torch.bool, device=s.device)


def unstructured_masks(result, model: nn.Module, sparsity: float, scope: str = "global",
                       layers: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Masks (1 = keep) from per-weight scores.

    result: a ScoreResult with ``.weight`` scores (``score(..., granularity="weight")``), or a
        dict ``{layer name: score tensor shaped like the layer's weight}``.
    sparsity: fraction of weights set to zero, in [0, 1).
    scope: "global" (one ranking over all layers) or "layer" (each layer at ``sparsity``).
    layers: restrict to these layer names (default: every scored layer).
    Returns ``{layer name: mask}`` with masks shaped (and on the device) like the weights.
    Iterative pruning: weights an earlier round masked (``weight_mask == 0``, from
    ``apply_masks(..., permanent=False)``) are counted first among the zeros, so a later round at
    a higher sparsity keeps them masked and removes the lowest-|score| survivors (a masked
    model's scores are those of its effective weights: masked entries score 0).
    """
    if not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: expected a fraction of zeros in [0, 1), got {sparsity!r}")
    if scope not in _SCOPES:
        raise ValueError(f"scope: expected one of {list(_SCOPES)}, got {scope!r}")
    modules = dict(model.named_modules())
    scores = {}
    items = result.items() if hasattr(result, "items") else ()
    for name, s in items:
        s = getattr(s, "weight", s)
        if s is None:
            continue
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"result: scores of {name!r} must be a tensor, got {type(s).__name__}")
        scores[name] = s
    if layers is not None:
        layers = list(layers)
        missing = [n for n in layers if n not in scores]
        if missing:
            raise ValueError(f"layers: no per-weight scores for {missing}; "
                             f"score with granularity='weight'")
        scores = {n: scores[n] for n in layers}
    if not scores:
        raise ValueError("result: no per-weight scores; call oba_ext.score(..., granularity='weight')")
    for name, s in scores.items():
        if name not in modules:
            raise ValueError(f"result: {name!r} is not a module of the model")
        w = getattr(modules[name], _weight_param(modules[name]))
        if tuple(s.shape) != tuple(w.shape):
            raise ValueError(f"result: the score of {name!r} has shape {tuple(s.shape)}, the "
                             f"weight {tuple(w.shape)} (was the model pruned since scoring?)")
    masks = {}
    masked = {n: _masked_entries(modules[n], s) for n, s in scores.items()}
    if scope == "layer":
        for name, s in scores.items():
            pruned = _lowest(s, int(round(sparsity * s.numel())), masked[name])
            masks[name] = (~pruned).view(s.shape)
    else:
        names = list(scores)
        flat = torch.cat([scores[n].detach().flatten().double().cpu() for n in names])
        flat_masked = torch.cat([masked[n].flatten().cpu() for n in names])
        pruned = _lowest(flat, int(round(sparsity * flat.numel())), flat_masked)
        off = 0
        for n in names:
            k = scores[n].numel()
            masks[n] = (~pruned[off:off + k]).view(scores[n].shape)
            off += k
    for n, m in masks.items():
        w = getattr(modules[n], _weight_param(modules[n]))
        masks[n] = m.to(device=w.device, dtype=w.dtype)
    return masks


def apply_masks(model: nn.Module, masks: Dict[str, torch.Tensor], permanent: bool = False) -> nn.Module:
    """Apply masks with ``prune.custom_from_mask`` (reparametrized ``weight = weight_orig ⊙
    weight_mask``); ``permanent=True`` removes the reparametrization, leaving plain zeros."""
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules:
            raise ValueError(f"masks: {name!r} is not a module of the model")
        mod = modules[name]
        pname = _weight_param(mod)
        prune.custom_from_mask(mod, pname, mask)
        if permanent:
            prune.remove(mod, pname)
    return model


def sparsity_of(model: nn.Module, names: Iterable[str]) -> float:
    """Fraction of exact zeros in the (effective) weights of the named layers."""
    modules = dict(model.named_modules())
    zeros = total = 0
    for n in names:
        w = getattr(modules[n], _weight_param(modules[n]))
        zeros += int((w == 0).sum())
        total += w.numel()
    return zeros / max(total, 1)


def prune_unstructured(model: nn.Module, batches, sparsity: float, kind: str = "oba",
                       scope: str = "global", permanent: bool = False,
                       loss_fn: Optional[Callable] = None, ignore: Iterable = (),
                       score_fn: Optional[Callable] = None, **score_kwargs):
    """Score ``model`` per weight with ``kind`` and mask it in place at ``sparsity``.
    Returns ``(masks, ScoreResult)``."""
    if score_fn is None:
        from ..scoring import score as score_fn
    res = score_fn(model, batches, loss_fn=loss_fn, kind=kind, granularity="weight",
                   ignore=ignore, **score_kwargs)
    masks = unstructured_masks(res, model, sparsity, scope)
    apply_masks(model, masks, permanent=permanent)
    return masks, res


def refresh_masked_weights(model: nn.Module) -> nn.Module:
    """Recompute every masked ``weight = weight_orig ⊙ weight_mask`` as a plain detached tensor,
    so the model can be deep-copied (``copy.deepcopy`` refuses non-leaf tensors). The forward
    pre-hook of ``torch.nn.utils.prune`` recomputes it with autograd at the next forward."""
    with torch.no_grad():
        for mod in model.modules():
            for hook in list(mod._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    setattr(mod, hook._tensor_name, hook.apply_mask(mod).detach())
    return model
