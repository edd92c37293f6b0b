"""Structured pruning with Torch-Pruning, to a pruning ratio or to a FLOPs / parameter target.

:func:`build_pruner` wraps ``tp.pruner.MetaPruner`` with the defaults this project uses
(classifier ignored, attention heads grouped, ViT fix-ups). :func:`prune_to_target` reaches a
target fraction of FLOPs or parameters kept within a relative tolerance (default 3%): for each
of ``steps`` schedule steps it bisects MetaPruner's ``pruning_ratio`` on deep copies of the
current model, measuring ``tp.utils.count_ops_and_params``; the importance scores the current
model once per step (copies of an unchanged model reuse the cached scores).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

import torch_pruning as tp

from ..targets import lookup_kind


class TargetUnreachableError(ValueError):
    """The requested FLOPs/parameter target cannot be reached within the tolerance."""


def _vit_fixup(m: nn.Module) -> None:
    # torchvision VisionTransformer reshapes with self.hidden_dim in _process_input
    m.hidden_dim = m.conv_proj.out_channels


def _mha_fixup(m: nn.Module) -> None:
    m.head_dim = m.embed_dim // m.num_heads
    m.kdim = m.vdim = m.embed_dim


#: module type -> function that makes its attributes consistent with its pruned parameters
FIXUPS: Dict[type, Callable[[nn.Module], None]] = {nn.MultiheadAttention: _mha_fixup}
try:  # torchvision is optional at import time
    from torchvision.models.vision_transformer import VisionTransformer as _TVViT
    FIXUPS[_TVViT] = _vit_fixup
except Exception:  # pragma: no cover
    pass


def apply_fixups(model: nn.Module) -> None:
    for m in model.modules():
        for cls in type(m).__mro__:
            if cls in FIXUPS:
                FIXUPS[cls](m)
                break


def _forward(model, example_inputs):
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def output_layers(model: nn.Module, example_inputs) -> List[str]:
    """Names of the target layers whose output *is* the model output (the classifier)."""
    outs: Dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: outs.__setitem__(n, o))
             for n, m in model.named_modules() if lookup_kind(m) is not None]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = _forward(model, example_inputs)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return [n for n, o in outs.items() if o is y]


def count(model: nn.Module, example_inputs):
    """(MACs, params) from ``tp.utils.count_ops_and_params`` (Torch-Pruning calls MACs 'ops')."""
    ops, params = tp.utils.count_ops_and_params(model, example_inputs)
    return float(ops), float(params)


def build_pruner(model: nn.Module, example_inputs, importance, pruning_ratio: float = 0.5,
                 global_pruning: bool = True, ignored_layers: Iterable = (),
                 round_to: Optional[int] = None, iterative_steps: int = 1,
                 max_pruning_ratio: float = 0.95, ignore_classifier: bool = True,
                 prune_num_heads: bool = False, head_pruning_ratio: float = 0.0,
                 **kwargs) -> tp.pruner.MetaPruner:
    """A ``tp.pruner.MetaPruner`` for ``model``.

    ignored_layers: module names or modules left unpruned; with ``ignore_classifier`` the
        layer producing the model output is added (its outputs are the classes).
    Attention: every ``nn.MultiheadAttention`` gets ``out_channel_groups = num_heads`` so its
        embed dim is pruned evenly over heads; ``num_heads``/``prune_num_heads``/
        ``head_pruning_ratio`` pass through for models whose q/k/v are separate Linear layers
        (Torch-Pruning's head pruning works on those only).
    kwargs: any other MetaPruner argument.
    """
    if not 0.0 <= pruning_ratio < 1.0:
        raise ValueError(f"pruning_ratio: expected a value in [0, 1), got {pruning_ratio}")
    modules = dict(model.named_modules())
    ignored = []
    for x in ignored_layers:
        if isinstance(x, str):
            if x not in modules:
                raise ValueError(f"ignored_layers: {x!r} is not a module of the model")
            ignored.append(modules[x])
        else:
            ignored.append(x)
    if ignore_classifier:
        ignored += [modules[n] for n in output_layers(model, example_inputs)]
    # nn.MultiheadAttention: Torch-Pruning's num_heads/head pruning only understands separate
    # q/k/v Linear layers (timm style); a packed MHA's embed dim is kept divisible by its heads
    # by grouping its channels per head (the recipe of Torch-Pruning's torchvision example).
    out_groups = dict(kwargs.pop("out_channel_groups", {}))
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            out_groups.setdefault(m, m.num_heads)
    return tp.pruner.MetaPruner(
        model, example_inputs, importance=importance, pruning_ratio=pruning_ratio,
        global_pruning=global_pruning, ignored_layers=ignored, round_to=round_to,
        iterative_steps=iterative_steps, max_pruning_ratio=max_pruning_ratio,
        out_channel_groups=out_groups, num_heads=dict(kwargs.pop("num_heads", {})),
        prune_num_heads=prune_num_heads,
        head_pruning_ratio=head_pruning_ratio, **kwargs)


def prune_once(model: nn.Module, example_inputs, importance, pruning_ratio: float, **kwargs) -> nn.Module:
    """Prune ``model`` in place with one MetaPruner step; returns it."""
    if pruning_ratio <= 0:
        return model
    pruner = build_pruner(model, example_inputs, importance, pruning_ratio=pruning_ratio, **kwargs)
    pruner.step()
    apply_fixups(model)
    return model


def _channel_grouped(m: nn.Module) -> bool:
    """Layers whose channels Torch-Pruning removes in coarse steps (heads, conv groups)."""
    return isinstance(m, nn.MultiheadAttention) or (isinstance(m, nn.modules.conv._ConvNd)
                                                     and m.groups > 1)


@dataclass
class PruneOutcome:
    """What :func:`prune_to_target` did. Fractions are of the unpruned model's counts."""
    model: nn.Module
    metric: str
    target: float
    achieved: float
    macs_before: float
    macs_after: float
    params_before: float
    params_after: float
    step_ratios: List[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("metric", "target", "achieved", "macs_before", "macs_after",
                                            "params_before", "params_after", "step_ratios", "seconds")}
        d["within"] = abs(self.achieved - self.target) / self.target
        return d


def _search_step(model, example_inputs, importance, target_abs, metric, tol_abs, max_ratio,
                 iters, kwargs, hi=None):
    """Bisect the pruning ratio so that ``metric(pruned copy)`` ~ target_abs. Returns
    (best ratio, best pruned copy, its metric value)."""
    idx = 0 if metric == "flops" else 1

    def trial(r):
        m = copy.deepcopy(model)
        prune_once(m, example_inputs, importance, r, max_pruning_ratio=max_ratio, **kwargs)
        return m, count(m, example_inputs)[idx]

    best = (0.0, model, count(model, example_inputs)[idx])
    if best[2] <= target_abs + tol_abs:
        return best
    lo, hi = 0.0, max_ratio if hi is None else hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        m, v = trial(mid)
        if abs(v - target_abs) < abs(best[2] - target_abs):
            best = (mid, m, v)
        if abs(v - target_abs) <= 0.25 * tol_abs:  # well inside: stop; else keep closing in
            break
        if v > target_abs:
            lo = mid
        else:
            hi = mid
    return best


def prune_to_target(model: nn.Module, example_inputs, importance, *, flops_ratio: Optional[float] = None,
                    params_ratio: Optional[float] = None, tol: float = 0.03, steps: int = 1,
                    between_steps: Optional[Callable[[nn.Module, int], None]] = None,
                    max_pruning_ratio: float = 0.95, search_iters: int = 14, refine: int = 3,
                    progress: bool = True, **pruner_kwargs) -> PruneOutcome:
    """Prune a copy of ``model`` until it keeps ``flops_ratio`` of its MACs (or ``params_ratio``
    of its parameters), within ``tol`` relative error: ``|kept/before − ratio| ≤ tol·ratio``.

    steps: iterative schedule; step k keeps ``1 − (1 − ratio)·k/steps`` and rescores the
        current model first; ``between_steps(model, k)`` (e.g. a short fine-tune) runs after
        each step but the last.
    refine: extra searches from the best model found when one ratio straddles the target
        (each rescoring the pruned model); ``step_ratios`` lists every ratio applied.
    pruner_kwargs: passed to :func:`build_pruner` (global_pruning, round_to, ignored_layers, ...).
    Raises ``TargetUnreachableError`` naming the achieved fraction when the target cannot be
    met. ``model`` itself is not modified; ``PruneOutcome.model`` is the pruned copy.
    """
    if (flops_ratio is None) == (params_ratio is None):
        raise ValueError("prune_to_target: give exactly one of flops_ratio / params_ratio")
    metric, ratio = ("flops", flops_ratio) if flops_ratio is not None else ("params", params_ratio)
    name = f"{metric}_ratio"
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
        raise ValueError(f"{name}: expected a fraction kept in (0, 1), got {ratio!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    t0 = time.perf_counter()
    macs0, params0 = count(model, example_inputs)
    base = macs0 if metric == "flops" else params0
    current = model
    ratios = []
    it = range(1, steps + 1)
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(it, desc=f"prune to {ratio:.0%} {metric}", unit="step")
    for k in it:
        target_k = base * (1.0 - (1.0 - ratio) * k / steps)
        tol_abs = tol * ratio * base if k == steps else tol * target_k
        r, current, v = _search_step(current, example_inputs, importance, target_k, metric,
                                     tol_abs, max_pruning_ratio, search_iters, pruner_kwargs)
        ratios.append(r)
        # Channel counts are integers and groups jump together, so one ratio may straddle the
        # target (e.g. a ViT's hidden dim moves in steps of num_heads). Refine from the best
        # model found: a small extra ratio removes the few channels that close the gap.
        # If that still straddles it, refine once more with the channel-grouped layers frozen
        # (their groups move in steps of num_heads / conv groups).
        for frozen in (False, True):
            kw = pruner_kwargs
            if frozen:
                kw = dict(pruner_kwargs, ignored_layers=list(pruner_kwargs.get("ignored_layers", ()))
                          + [n for n, m in current.named_modules() if _channel_grouped(m)])
            for _ in range(refine):
                if v - target_k <= tol_abs:
                    break
                # the gap is small: small ratios suffice, so search [0, 0.25·max] with fewer steps
                r2, cur2, v2 = _search_step(current, example_inputs, importance, target_k, metric,
                                            tol_abs, max_pruning_ratio, max(6, search_iters // 2),
                                            kw, hi=0.25 * max_pruning_ratio)
                if abs(v2 - target_k) >= abs(v - target_k):
                    break
                current, v = cur2, v2
                ratios.append(r2)
        if between_steps is not None and k < steps:
            between_steps(current, k)
    if current is model:
        current = copy.deepcopy(model)
    macs1, params1 = count(current, example_inputs)
    achieved = (macs1 / macs0) if metric == "flops" else (params1 / params0)
    out = PruneOutcome(current, metric, float(ratio), achieved, macs0, macs1, params0, params1,
                       ratios, time.perf_counter() - t0)
    if abs(achieved - ratio) > tol * ratio:
        raise TargetUnreachableError(
            f"{name}: cannot reach {ratio:.4f} of the {metric} within {tol:.0%}: the closest "
            f"pruning kept {achieved:.4f} (max_pruning_ratio={max_pruning_ratio}, ignored layers "
            f"and round_to limit how far channels can be removed)")
    return out
