"""Equivalent Pruning (Optimal Brain Connection, arXiv 2508.05521; SPEC §6).

For every chain ``producer → [BN] → channel-wise ops → consumer`` (conv→BN→act→conv in VGG and
inside ResNet basic/bottleneck blocks; Linear→act→Linear in MLP/ViT blocks) this module

1. **inserts** an identity-initialised compressor ``C`` (a 1×1 conv / bias-free Linear,
   ``(c, c)``) right after the producer (before its BN) and a decompressor ``D`` ``(c, c)``
   right before the consumer: ``y = BN(C·(W⊛x + b)) → act → D → consumer``;
2. **prunes** only the compressor's rows: ``C ← C[keep]`` ``(k, c)``, the BN channels between
   them ``BN ← BN[keep]``, and ``D ← D[:, keep]`` ``(c, k)``. With ``C = I``, ``D = I`` this is
   exactly naive pruning of the producer's output channels;
3. after fine-tuning everything, **merges** exactly into a plain pruned network:
   ``W' = C·W`` ``(k, c_in, …)``, ``b' = C·b``, ``W_next' = W_next·D`` ``(c_out, k, …)``
   (``D`` is a per-position linear map, so it commutes with the consumer's padding).

The inference cost after merging equals that of the naively pruned network.

Chains are found with ``torch.fx`` (tracing the whole model, or its children where the whole
does not trace). The path between producer and consumer may only hold ops registered in
:data:`CHANNELWISE_MODULES` / :data:`CHANNELWISE_FUNCTIONS` / :data:`CHANNELWISE_METHODS`; every
intermediate value must have exactly one user (no residual taps), producer and consumer must
be ungrouped and called once. Role "any": elementwise, valid for conv and Linear chains;
role "dim1": acts per channel on dim 1 (pools, BatchNorm, Dropout2d), valid for conv chains
only (a Linear's channels are its last dim).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..scoring import score

#: producer/consumer layer types -> (constructor of an identity (c, c) map, out attr, in attr)
LAYER_TYPES = {
    nn.Conv1d: (lambda c, ref: nn.Conv1d(c, c, 1, bias=False), "out_channels", "in_channels"),
    nn.Conv2d: (lambda c, ref: nn.Conv2d(c, c, 1, bias=False), "out_channels", "in_channels"),
    nn.Linear: (lambda c, ref: nn.Linear(c, c, bias=False), "out_features", "in_features"),
}

#: parameter-free or per-channel modules allowed between producer and consumer -> role
CHANNELWISE_MODULES = {
    nn.ReLU: "any", nn.ReLU6: "any", nn.GELU: "any", nn.SiLU: "any", nn.Tanh: "any",
    nn.Sigmoid: "any", nn.LeakyReLU: "any", nn.Hardswish: "any", nn.ELU: "any",
    nn.Mish: "any", nn.Identity: "any", nn.Dropout: "any",
    nn.Dropout1d: "dim1", nn.Dropout2d: "dim1",
    nn.MaxPool1d: "dim1", nn.MaxPool2d: "dim1", nn.AvgPool1d: "dim1", nn.AvgPool2d: "dim1",
    nn.AdaptiveAvgPool2d: "dim1", nn.AdaptiveMaxPool2d: "dim1",
    nn.BatchNorm1d: "bn", nn.BatchNorm2d: "bn",
}
CHANNELWISE_FUNCTIONS = {
    F.relu: "any", torch.relu: "any", F.relu6: "any", F.gelu: "any", F.silu: "any",
    torch.sigmoid: "any", torch.tanh: "any", F.leaky_relu: "any", F.hardswish: "any",
    F.dropout: "any", F.max_pool2d: "dim1", F.avg_pool2d: "dim1", F.adaptive_avg_pool2d: "dim1",
}
CHANNELWISE_METHODS = {"relu": "any", "relu_": "any", "sigmoid": "any", "tanh": "any"}


def _lookup(table, module: nn.Module):
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


@dataclass(frozen=True)
class Chain:
    """A prunable chain: ``producer`` output channels → ``norms`` (BN layers to slice) →
    ``consumer`` input channels; names are qualified module names of the original model."""

    producer: str
    consumer: str
    norms: Tuple[str, ...]
    channels: int


class EquivalentWrapper(nn.Module):
    """``y = compressor(layer(decompressor(x)))``; either map may be None.

    compressor: ``(k, c)`` map on the layer's output channels (dim 1 for convs, last dim for
    Linear); decompressor: ``(c_in, k')`` map on its input. ``chain`` is set on a producer's
    wrapper (the :class:`Chain` it starts)."""

    def __init__(self, layer: nn.Module, decompressor: Optional[nn.Module] = None,
                 compressor: Optional[nn.Module] = None, chain: Optional[Chain] = None):
        super().__init__()
        self.layer = layer
        self.decompressor = decompressor
        self.compressor = compressor
        self.chain = chain

    def forward(self, x):
        if self.decompressor is not None:
            x = self.decompressor(x)
        y = self.layer(x)
        if self.compressor is not None:
            y = self.compressor(y)
        return y


def _graphs(model: nn.Module, prefix: str = ""):
    """(prefix, fx.GraphModule) pairs: the whole model, or its children where it fails."""
    try:
        return [(prefix, torch.fx.symbolic_trace(model))]
    except Exception:  # noqa: BLE001 - any tracing failure: try the children
        out = []
        for name, child in model.named_children():
            out += _graphs(child, f"{prefix}{name}.")
        return out


def _role(node, gm) -> Optional[str]:
    if node.op == "call_module":
        return _lookup(CHANNELWISE_MODULES, gm.get_submodule(node.target))
    if node.op == "call_function":
        return CHANNELWISE_FUNCTIONS.get(node.target)
    if node.op == "call_method":
        return CHANNELWISE_METHODS.get(node.target)
    return None


def find_chains(model: nn.Module) -> List[Chain]:
    """All producer→consumer chains of ``model`` that Equivalent Pruning can compress
    (module docstring for the rules), in graph order."""
    chains: List[Chain] = []
    for prefix, gm in _graphs(model):
        calls: Dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        for n in gm.graph.nodes:
            if n.op != "call_module" or calls[n.target] != 1:
                continue
            prod = gm.get_submodule(n.target)
            spec = _lookup(LAYER_TYPES, prod)
            if spec is None or getattr(prod, "groups", 1) != 1:
                continue
            is_conv = spec[1] == "out_channels"
            c = getattr(prod, spec[1])
            cur, norms = n, []
            while len(cur.users) == 1:
                u = next(iter(cur.users))
                if not u.args or u.args[0] is not cur or any(a is cur for a in u.args[1:]):
                    break
                if u.op == "call_module" and calls[u.target] == 1:
                    cons = gm.get_submodule(u.target)
                    cspec = _lookup(LAYER_TYPES, cons)
                    if cspec is not None:
                        if (type(cons) is type(prod) and getattr(cons, "groups", 1) == 1
                                and getattr(cons, cspec[2]) == c):
                            chains.append(Chain(prefix + n.target, prefix + u.target,
                                                tuple(norms), c))
                        break
                role = _role(u, gm)
                if role is None or (role != "any" and not is_conv):
                    break
                if role == "bn":
                    if calls[u.target] != 1 or gm.get_submodule(u.target).num_features != c:
                        break
                    norms.append(prefix + u.target)
                cur = u
    return chains


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _wrapper(model: nn.Module, name: str) -> EquivalentWrapper:
    mod = model.get_submodule(name)
    if not isinstance(mod, EquivalentWrapper):
        mod = EquivalentWrapper(mod)
        _set_module(model, name, mod)
    return mod


def _identity_like(layer: nn.Module, c: int) -> nn.Module:
    make = _lookup(LAYER_TYPES, layer)[0]
    m = make(c, layer).to(device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        m.weight.zero_()
        m.weight.view(c, c).copy_(torch.eye(c, dtype=m.weight.dtype, device=m.weight.device))
    return m


def insert_compressors(model: nn.Module, chains: Optional[Sequence[Chain]] = None) -> List[Chain]:
    """Insert identity compressors/decompressors for ``chains`` (default: :func:`find_chains`),
    in place. Producer ``p`` becomes ``EquivalentWrapper`` at ``p`` with the original layer
    at ``p.layer`` and the compressor at ``p.compressor`` (a target layer: score its rows);
    consumer ``q`` gets ``q.decompressor``. Outputs are unchanged. Returns the chains."""
    if any(isinstance(m, EquivalentWrapper) for m in model.modules()):
        raise ValueError("model: already holds compressors (insert_compressors ran before); "
                         "merge_compressors(model) first")
    chains = find_chains(model) if chains is None else list(chains)
    for ch in chains:
        pw, cw = _wrapper(model, ch.producer), _wrapper(model, ch.consumer)
        pw.compressor = _identity_like(pw.layer, ch.channels)
        pw.chain = ch
        cw.decompressor = _identity_like(cw.layer, ch.channels)
    return chains


def compressor_names(model: nn.Module) -> List[str]:
    """Qualified names of the compressor layers (pass as ``targets=`` to ``oba_ext.score``)."""
    return [f"{n}.compressor" for n, m in model.named_modules()
            if isinstance(m, EquivalentWrapper) and m.compressor is not None]


def _replace_param(mod: nn.Module, name: str, value: Tensor):
    setattr(mod, name, nn.Parameter(value.detach().clone(), requires_grad=True))


def _set_width(mod: nn.Module, which: int, value: int):
    setattr(mod, _lookup(LAYER_TYPES, mod)[which], value)


def _slice_bn(bn: nn.Module, keep: Tensor):
    if bn.affine:
        _replace_param(bn, "weight", bn.weight[keep])
        _replace_param(bn, "bias", bn.bias[keep])
    if bn.track_running_stats and bn.running_mean is not None:
        bn.running_mean = bn.running_mean[keep].clone()
        bn.running_var = bn.running_var[keep].clone()
    bn.num_features = int(keep.numel())


def prune_compressors(model: nn.Module, keep: Dict[str, Tensor]):
    """Keep only rows ``keep[p]`` (sorted unique indices into the current compressor rows) of
    the compressor after producer ``p``; slice the chain's BN channels and the decompressor's
    columns to match. Producers not in ``keep`` are left alone. In place."""
    wrappers = {n: m for n, m in model.named_modules()
                if isinstance(m, EquivalentWrapper) and m.compressor is not None}
    for prod, idx in keep.items():
        if prod not in wrappers:
            raise ValueError(f"keep: {prod!r} is not a producer with a compressor; "
                             f"producers: {sorted(wrappers)}")
        w = wrappers[prod]
        rows = w.compressor.weight.shape[0]
        idx = torch.as_tensor(idx, dtype=torch.long, device=w.compressor.weight.device)
        if idx.dim() != 1 or idx.numel() == 0 or idx.unique().numel() != idx.numel() \
                or idx.min() < 0 or idx.max() >= rows:
            raise ValueError(f"keep[{prod!r}]: expected 1..{rows} distinct indices in "
                             f"[0, {rows}), got {idx.tolist()}")
        idx = idx.sort().values
        _replace_param(w.compressor, "weight", w.compressor.weight[idx])
        _set_width(w.compressor, 1, int(idx.numel()))
        for bn in w.chain.norms:
            _slice_bn(model.get_submodule(bn), idx)
        cw = model.get_submodule(w.chain.consumer)
        _replace_param(cw.decompressor, "weight", cw.decompressor.weight[:, idx])
        _set_width(cw.decompressor, 2, int(idx.numel()))


def _compressor_scores(scores, model: nn.Module) -> Dict[str, Tensor]:
    out = {}
    for cname in compressor_names(model):
        if cname not in scores:
            raise ValueError(f"scores: no scores for compressor layer {cname!r}")
        s = scores[cname]
        s = getattr(s, "out", s)
        if s is None:
            raise ValueError(f"scores: layer {cname!r} has no 'out' scores; score with "
                             f"granularity including 'out'")
        out[cname[: -len(".compressor")]] = s.detach().abs().double().flatten().cpu()
    return out


def select_keep(scores, model: nn.Module, ratio: float, min_keep: int = 1, round_to: int = 1,
                global_ranking: bool = False) -> Dict[str, Tensor]:
    """Per producer, the compressor rows to keep (sorted indices), by largest ``|score|``.

    Per layer (default): ``ceil((1 − ratio)·rows)`` rows, rounded up to a multiple of
    ``round_to``, at least ``min_keep``. ``global_ranking``: the ``floor(ratio·Σ rows)`` rows of
    smallest ``|score|`` over all compressors are dropped, lowest first, skipping rows whose
    layer would fall below ``min_keep`` (scores must be comparable across layers, e.g. loss
    changes such as "jacobian" or "taylor"); ``round_to`` is not applied there.

    scores: an ``oba_ext.ScoreResult`` holding ``"<producer>.compressor"`` layers with
    ``out`` scores, or a dict ``{compressor name: (rows,) tensor}``."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio: expected 0 <= ratio < 1 (the fraction of rows to prune), got {ratio}")
    if min_keep < 1 or round_to < 1:
        raise ValueError(f"min_keep, round_to: expected >= 1, got {min_keep}, {round_to}")
    s = _compressor_scores(scores, model)
    if global_ranking:
        flat = [(v, prod, i) for prod, t in s.items() for i, v in enumerate(t.tolist())]
        flat.sort(key=lambda r: r[0])
        n_drop = int(ratio * len(flat) + 1e-9)
        left = {prod: t.numel() for prod, t in s.items()}
        dropped = {prod: set() for prod in s}
        for _, prod, i in flat:
            if n_drop == 0:
                break
            if left[prod] > min_keep:
                dropped[prod].add(i)
                left[prod] -= 1
                n_drop -= 1
        return {prod: torch.tensor(sorted(set(range(t.numel())) - dropped[prod]), dtype=torch.long)
                for prod, t in s.items()}
    keep = {}
    for prod, t in s.items():
        rows = t.numel()
        k = -(-int(round((1.0 - ratio) * rows * 1e6)) // 1_000_000)  # ceil, robust to fp noise
        k = min(rows, max(min_keep, -(-k // round_to) * round_to))
        keep[prod] = torch.topk(t, k).indices.sort().values
    return keep


def select_keep_for_target(scores, model: nn.Module, measure, target: float, tol: float = 0.01,
                           max_ratio: float = 0.95, **select_kwargs) -> Dict[str, Tensor]:
    """The :func:`select_keep` result whose merged network keeps ``target`` (a fraction) of
    the unpruned ``measure(model) -> float`` (e.g. MACs or parameters of a merged copy), by
    bisection on the ratio (≤ 40 steps, stops within ``tol``). ``model`` holds compressors and
    is not modified; returns the keep dict of the last ratio whose cost is ≤ target·base
    (or the lightest reachable one)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target: expected a fraction in (0, 1], got {target}")

    def cost(keep):
        m = copy.deepcopy(model)
        if keep:
            prune_compressors(m, keep)
        return float(measure(merge_compressors(m)))

    base = cost({})
    lo, hi = 0.0, max_ratio
    best = select_keep(scores, model, hi, **select_kwargs)
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        keep = select_keep(scores, model, mid, **select_kwargs)
        frac = cost(keep) / base
        if frac <= target:
            best, hi = keep, mid
            if target - frac <= tol:
                break
        else:
            lo = mid
    return best


def merge_compressors(model: nn.Module) -> nn.Module:
    """Fold every compressor/decompressor into its layer, in place (and returned):
    ``W' = C·W``, ``b' = C·b`` for producers, ``W' = W·D`` for consumers; each wrapper is
    replaced by its (resized) layer under its original name."""
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, EquivalentWrapper)]
    with torch.no_grad():
        for name, w in wrappers:
            layer = w.layer
            if w.compressor is not None:
                c = w.compressor.weight.reshape(w.compressor.weight.shape[0], -1)
                wt = layer.weight
                _replace_param(layer, "weight", (c @ wt.reshape(wt.shape[0], -1))
                               .reshape(c.shape[0], *wt.shape[1:]))
                if layer.bias is not None:
                    _replace_param(layer, "bias", c @ layer.bias)
                _set_width(layer, 1, c.shape[0])
            if w.decompressor is not None:
                d = w.decompressor.weight.reshape(w.decompressor.weight.shape[0], -1)
                _replace_param(layer, "weight", torch.einsum("oi...,ij->oj...", layer.weight, d))
                _set_width(layer, 2, d.shape[1])
            _set_module(model, name, layer)
    return model


def score_compressors(model: nn.Module, batches, kind: str = "jacobian", **score_kwargs):
    """``oba_ext.score`` of the compressor layers only (``targets=compressor_names(model)``,
    ``granularity="out"``): one score per compressor row, ready for :func:`select_keep`."""
    names = compressor_names(model)
    if not names:
        raise ValueError("model: no compressors; call insert_compressors(model) first")
    score_kwargs.setdefault("progress", False)
    return score(model, batches, kind=kind, targets=names, granularity="out", **score_kwargs)
