"""What a layer kind is: :class:`LayerKind`, the one record every consumer reads.

A layer kind says which module types it covers, which of their parameters are target
parameters (θ, SPEC §1), which score keys exist and their shapes, how per-parameter scores
reduce to channel scores (SPEC §5), which Torch-Pruning pruning functions its channel scores
measure, where its attention heads are, and how many channels a report counts. Consumers:

- :mod:`oba_ext.targets` (which modules are scored), the engine's sweep (keys, zero-filled
  shapes), the reference path (:func:`oba_ext.reference.structured.reduce_layer`),
  :class:`oba_ext.pruning.OBAImportance` (``tp_handlers``), :mod:`oba_ext.heads`
  (``head_layout``) and :func:`oba_ext.report.channels_per_layer` (``channels``).

Score key names: ``"out"``, ``"in"``, ``"weight"``, ``"bias"`` (and ``"parts.<name>.<key>"``
sub-scores). ``"in"`` is the granularity/key name everywhere; only the Python attribute of
:class:`oba_ext.LayerScores` is ``.inp`` (``in`` is a Python keyword).

This module holds the record and the reductions shared by several kinds; each kind lives in
its own file of this package.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

Shape = Tuple[int, ...]
#: reduce(module, {local param name: per-parameter scores}, keys) -> {key: channel scores}
Reducer = Callable[[nn.Module, Dict[str, Tensor], Iterable[str]], Dict[str, Tensor]]
#: handler(layer, layer_scores or None, idxs, all scores {name: LayerScores}, names {module: name})
#:   -> list of (len(idxs),) tensors whose |.| measure removing channels ``idxs``
TPHandler = Callable[..., List[Tensor]]


@dataclass(frozen=True)
class HeadGroup:
    """One attention block: where its head score goes and which channel scores form it.

    key: the result entry that receives ``head``.
    num_heads: H (query heads).
    embed_dim: E = H · head_dim (query width).
    qkv: ``(layer name, part, offset, width, heads)``: the out-channel scores of ``part``
        ("q", "k", "v") are ``sums[layer]["out"][offset : offset + width]``, laid out as
        ``heads`` head-major blocks. ``heads`` < H for grouped-query k/v projections: a k/v head
        serves ``H / heads`` query heads, and its score is shared out equally among them
        (so Σ head = Σ of every channel score, nothing is counted twice).
    packed: layer that should also report ``parts.{q,k,v}.out`` (a packed qkv Linear), or None.
    out_in: layer whose "in" channels (E,) are the heads' outputs (output projection), or None.
    """

    key: str
    num_heads: int
    embed_dim: int
    qkv: Tuple[Tuple[str, str, int, int, int], ...]
    packed: Optional[str]
    out_in: Optional[str]


@dataclass(frozen=True)
class LayerKind:
    """One layer kind (see the module docstring).

    name: the kind's name ("linear", "conv", ...), as in ``LayerSpec.kind``.
    module_types: the ``nn.Module`` classes of this kind (subclasses resolve along the MRO).
    lazy_types: ``(module path, class name)`` of classes from optional packages (e.g.
        ``("transformers.pytorch_utils", "Conv1D")``), added to the kind once their module has
        been imported by the user (oba_ext never imports such a package itself).
    params: local names of target parameters, in order (missing/None ones are skipped).
    keys: score keys the scorers produce for this kind.
    shape: ``shape(module, key) -> shape or None``: the shape of key's scores, used to
        zero-fill layers a sweep did not reach (None: the kind's rule records every key itself).
    reduce: per-parameter scores -> channel scores (SPEC §5), the reference path's reduction.
    tp_handlers: ``{name in torch_pruning.pruner.function: handler}``.
    channels: ``channels(module) -> int``: channels a report counts (output channels).
    head_layout: ``head_layout(name, module) -> HeadGroup or None``, for attention modules.
    target: True for target layers (θ); False for normalization layers (scored only by
        criteria that ask for them, SPEC §6).
    direction: ``direction(module, local name, t) -> t`` with the entries that never move set
        to 0 (reference path, δθ = θ and any direction ``v``), for a kind that has such
        entries; None: every entry moves (every built-in kind: an Embedding's ``padding_idx``
        row is a parameter, only its lookup is a constant,
        :func:`oba_ext.reference.decompose.embedding_lookup`).
    engine_direction: whether the kind's engine rule moves it along any direction ``v``
        (curvature products, :func:`oba_ext.hvp`); False: only along δθ = θ, and the engine
        refuses directions for models with such a layer (the reference path runs them).
    """

    name: str
    module_types: Tuple[type, ...]
    params: Tuple[str, ...]
    keys: Tuple[str, ...]
    shape: Callable[[nn.Module, str], Optional[Shape]]
    reduce: Reducer
    tp_handlers: Mapping[str, TPHandler]
    channels: Callable[[nn.Module], int]
    head_layout: Optional[Callable[[str, nn.Module], Optional[HeadGroup]]] = None
    target: bool = True
    direction: Optional[Callable[[nn.Module, str, Tensor], Tensor]] = None
    engine_direction: bool = True
    lazy_types: Tuple[Tuple[str, str], ...] = ()


# ---------------------------------------------------------------- shared reductions (SPEC §5)
def weight_out(w: Tensor, b: Optional[Tensor]) -> Tensor:
    """(C_out, ...) -> (C_out,): sum of each output row, plus the bias."""
    out = w.reshape(w.shape[0], -1).sum(1)
    return out if b is None else out + b


def weight_in(w: Tensor, groups: int = 1) -> Tensor:
    """(C_out, C_in/groups, *k) -> (C_in,): per input channel, summed over the rows that read it."""
    c_out, c_in_g = w.shape[0], w.shape[1]
    w2 = w.reshape(groups, c_out // groups, c_in_g, -1).sum(dim=(1, 3))  # (groups, C_in/groups)
    return w2.reshape(groups * c_in_g)


def reduce_rows_cols(keys: Iterable[str], w: Tensor, b: Optional[Tensor], out: Callable[[], Tensor],
                     inp: Callable[[], Tensor]) -> Dict[str, Tensor]:
    """The usual key loop of a weight(+bias) layer: "out"/"in" from the given reductions,
    "weight"/"bias" as they are."""
    res = {}
    for k in keys:
        if k == "out":
            res[k] = out()
        elif k == "in":
            res[k] = inp()
        elif k == "weight":
            res[k] = w
        elif k == "bias" and b is not None:
            res[k] = b
    return res


# ---------------------------------------------------------------- Torch-Pruning handlers
def take(s: Tensor, idxs, layer: nn.Module, what: str) -> Tensor:
    """``s[idxs]``, or ValueError when the indices do not fit (scores of another model)."""
    if len(idxs) and max(idxs) >= s.numel():
        raise ValueError(f"OBAImportance: {what} scores of {layer} have {s.numel()} entries but "
                         f"Torch-Pruning indexes up to {max(idxs)} (scores of another model?)")
    return s[idxs]


def tp_out(layer: nn.Module, ls, idxs, scores=None, names=None) -> List[Tensor]:
    """Output channels removed (rows of W and their bias) -> ``ls.out``."""
    return [] if ls is None or ls.out is None else [take(ls.out, idxs, layer, "output-channel")]


def tp_in(layer: nn.Module, ls, idxs, scores=None, names=None) -> List[Tensor]:
    """Input channels removed (columns of W) -> ``ls.inp``: (C_in,). A grouped conv whose
    input score has C_in/groups entries (per weight column) is tiled over the groups, the
    way Torch-Pruning indexes grouped-conv inputs."""
    if ls is None or ls.inp is None:
        return []
    s = ls.inp
    c_in = getattr(layer, "in_channels", getattr(layer, "in_features", s.numel()))
    groups = getattr(layer, "groups", 1)
    if s.numel() != c_in and groups > 1 and s.numel() * groups == c_in:
        s = s.repeat(groups)
    return [take(s, idxs, layer, "input-channel")]


def tp_depthwise(layer: nn.Module, ls, idxs, scores=None, names=None) -> List[Tensor]:
    """Torch-Pruning's depthwise handler serves both sides (in- and out-pruning are one
    function); a conv with groups == C_out < C_in is typed depthwise too, and then its idxs
    count input channels: use ``ls.inp`` when the idxs do not fit ``ls.out``."""
    if ls is None:
        return []
    if ls.out is not None and (not len(idxs) or max(idxs) < ls.out.numel()):
        return [ls.out[idxs]]
    return tp_in(layer, ls, idxs)


def zero_shape_dense(out_channels: Callable[[nn.Module], int],
                     in_channels: Callable[[nn.Module], int]):
    """``shape(module, key)`` for a layer with ``weight`` and optional ``bias``."""
    def shape(m: nn.Module, k: str) -> Optional[Shape]:
        if k == "out":
            return (out_channels(m),)
        if k == "in":
            return (in_channels(m),)
        if k == "weight":
            return tuple(m.weight.shape)
        if k == "bias":
            b = getattr(m, "bias", None)
            return tuple(b.shape) if isinstance(b, torch.Tensor) else None
        return None
    return shape
