"""Ground truth for the fidelity study: what removing output channels really does.

Removing output channel o of a target layer means zeroing its weight row o and its bias o
(SPEC §1: δθ = θ on that channel's parameters, nothing else moves — a BatchNorm after a conv
keeps its affine parameters and running statistics). Because ``Y[:, o] = W[o]⊛X + b[o]``, that
is exactly the same as setting the layer's output channel o to zero, which a forward hook does
without copying weights: :func:`channel_mask` installs such hooks (a test checks the
equivalence against zeroing the parameters).

- :func:`true_delta_loss`: for every output channel of every given layer, the held-out loss
  with only that channel removed minus the loss of the intact model (one evaluation each).
- :func:`prune_curve`: one-shot accuracy after removing the channels with the lowest
  ``rank_value`` (globally across layers, or the same fraction in every layer), no fine-tuning.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Mapping, Sequence, Tuple

import torch
from torch import nn

from .fidelity_models import Split, evaluate


@contextlib.contextmanager
def channel_mask(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Within the block, output channel o (dim 1) of module ``name`` is multiplied by
    ``masks[name][o]``: a bool tensor (C_out,) zeroes the False channels; a float tensor scales
    channels (scaling output channel o by 1 − ε is moving its weight row and bias by −ε·θ)."""
    modules = dict(model.named_modules())
    handles = []
    for name, keep in masks.items():
        if name not in modules:
            raise KeyError(f"masks: {name!r} is not a module of {type(model).__name__}")
        if bool((keep.to(torch.float64) == 1).all()):
            continue
        shape_keep = keep

        def hook(mod, inp, out, keep=shape_keep):
            if out.shape[1] != keep.numel():
                raise ValueError(f"channel_mask: mask of {keep.numel()} channels for an output "
                                 f"with {out.shape[1]} channels")
            view = [1, -1] + [1] * (out.dim() - 2)
            return out * keep.to(out.dtype).view(view)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def out_channels(module: nn.Module) -> int:
    w = module.weight
    return w.shape[0]


def true_delta_loss(model: nn.Module, layers: Sequence[str], data: Split,
                    progress: bool = True) -> Tuple[float, Dict[str, torch.Tensor]]:
    """(base held-out loss, {layer: ΔL per output channel (C_out,) float64}).

    ΔL_o = L(model with channel o removed) − L(model), both mean cross-entropy over ``data``
    evaluated in the model's dtype.
    """
    modules = dict(model.named_modules())
    base, _ = evaluate(model, data)
    total = sum(out_channels(modules[n]) for n in layers)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total, desc="true ΔL (one evaluation per channel)", unit="ch")
    out: Dict[str, torch.Tensor] = {}
    for name in layers:
        c = out_channels(modules[name])
        deltas = torch.empty(c, dtype=torch.float64)
        for o in range(c):
            keep = torch.ones(c, dtype=torch.bool)
            keep[o] = False
            with channel_mask(model, {name: keep}):
                loss, _ = evaluate(model, data)
            deltas[o] = loss - base
            if bar is not None:
                bar.update(1)
        out[name] = deltas
    if bar is not None:
        bar.close()
    return base, out


def masks_lowest(rank_value: Mapping[str, torch.Tensor], ratio: float, mode: str) -> Dict[str, torch.Tensor]:
    """Keep-masks removing the channels with the lowest ``rank_value``.

    mode "global": the lowest ``round(ratio · total)`` channels over all layers together;
    mode "per_layer": the lowest ``round(ratio · C_l)`` channels of every layer l.
    Ties keep the lower channel index first (a stable sort), so results are deterministic.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: expected a fraction in [0, 1), got {ratio}")
    names = list(rank_value)
    masks = {n: torch.ones(rank_value[n].numel(), dtype=torch.bool) for n in names}
    if mode == "global":
        flat = torch.cat([rank_value[n].double().flatten() for n in names])
        owner = [(n, i) for n in names for i in range(rank_value[n].numel())]
        k = int(round(ratio * flat.numel()))
        for j in torch.sort(flat, stable=True).indices[:k].tolist():
            n, i = owner[j]
            masks[n][i] = False
    elif mode == "per_layer":
        for n in names:
            v = rank_value[n].double().flatten()
            k = int(round(ratio * v.numel()))
            masks[n][torch.sort(v, stable=True).indices[:k]] = False
    else:
        raise ValueError(f"mode: expected 'global' or 'per_layer', got {mode!r}")
    return masks


def prune_curve(model: nn.Module, rank_value: Mapping[str, torch.Tensor], data: Split,
                ratios: Sequence[float], mode: str) -> List[Tuple[float, float, float]]:
    """[(ratio, held-out accuracy, held-out loss)] after one-shot removal at each ratio."""
    rows = []
    for r in ratios:
        with channel_mask(model, masks_lowest(rank_value, r, mode)):
            loss, acc = evaluate(model, data)
        rows.append((float(r), acc, loss))
    return rows


def channel_taylor2(model: nn.Module, layers: Sequence[str], data: Split,
                    progress: bool = True) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """The single-channel second-order Taylor model of removal, per output channel.

    With f(ε) = L(channel o scaled by 1 − ε), removal is f(1) − f(0) ≈ f'(0) + ½ f''(0), where
    f'(0) = −θ_c·g_c (= −taylor) and f''(0) = θ_cᵀ H_cc θ_c (the channel's own curvature block —
    unlike ``exact``'s θ_c·(Hθ)_c, which is the channel's share of the whole-network θᵀHθ).
    Computed by forward-over-forward AD of the masked forward (``torch.func.jvp`` twice; ε is
    a dual number in the hook). Returns {layer: (f'(0), f''(0))}, float64, shape (C_out,).
    """
    import torch.nn.functional as F
    modules = dict(model.named_modules())
    dtype = next(model.parameters()).dtype
    x, y = data.x.to(dtype), data.y
    out: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(out_channels(modules[n]) for n in layers), desc="channel f''(0)", unit="ch")
    for name in layers:
        c = out_channels(modules[name])
        d1, d2 = torch.empty(c, dtype=torch.float64), torch.empty(c, dtype=torch.float64)
        for o in range(c):
            onehot = torch.zeros(c, dtype=dtype)
            onehot[o] = 1

            def f(eps):
                def hook(mod, inp, y_out):
                    view = [1, -1] + [1] * (y_out.dim() - 2)
                    return y_out * (1 - eps * onehot).view(view)
                h = modules[name].register_forward_hook(hook)
                try:
                    return F.cross_entropy(model(x), y)
                finally:
                    h.remove()

            e0, one = torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)
            df = lambda e: torch.func.jvp(f, (e,), (one,))  # noqa: E731
            (_, first), (_, second) = torch.func.jvp(df, (e0,), (one,))
            d1[o], d2[o] = first.item(), second.item()
            if bar is not None:
                bar.update(1)
        out[name] = (d1, d2)
    if bar is not None:
        bar.close()
    return out
