"""Which modules are scored, and how their parameters map to channels.

The layer kinds themselves (module types, target parameters, reductions, Torch-Pruning
handlers, head layouts) live in :mod:`oba_ext.layers`, one :class:`~oba_ext.layers.LayerKind`
per kind; this module resolves a model's target layers from them (SPEC §1). Lookup walks the
module's MRO, so subclasses of ``nn.Linear`` (e.g. ``NonDynamicallyQuantizableLinear``)
resolve without isinstance chains. Normalization layers (kind "norm") are scored only by
criteria that ask for them (the Jacobian Criterion scores BN/LN channels, SPEC §6).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from .layers import KINDS, MODULE_KINDS, LayerKind, resolve_lazy


class _KindView(Mapping):
    """Read-only, live ``{module type: kind name}`` view of :data:`oba_ext.layers.MODULE_KINDS`
    (target or normalization kinds), so lazily registered types appear once imported."""

    def __init__(self, target: bool):
        self._target = target

    def _items(self):
        resolve_lazy()
        return {c: k.name for c, k in MODULE_KINDS.items() if k.target == self._target}

    def __getitem__(self, cls):
        return self._items()[cls]

    def __iter__(self):
        return iter(self._items())

    def __len__(self):
        return len(self._items())

    def get(self, cls, default=None):
        resolve_lazy()
        k = MODULE_KINDS.get(cls)
        return k.name if k is not None and k.target == self._target else default


#: module type -> layer kind name, target layers only (read-only view of oba_ext.layers):
#: their weights and biases form θ (SPEC §1).
LAYER_KINDS: Mapping = _KindView(target=True)

#: normalization layers: never moved by δθ, scored only by criteria with ``norm_layers=True``.
NORM_KINDS: Mapping = _KindView(target=False)

#: parameter names (on the module itself) that are target parameters, per layer kind
KIND_PARAMS: Dict[str, Tuple[str, ...]] = {n: k.params for n, k in KINDS.items()}


def lookup_kind(module: nn.Module, table: Mapping = LAYER_KINDS) -> Optional[str]:
    """The kind name of ``module`` from ``table`` (first match along its MRO), or None."""
    resolve_lazy()
    for cls in type(module).__mro__:
        kind = table.get(cls)
        if kind is not None:
            return kind
    return None


@dataclass(frozen=True)
class LayerSpec:
    """A scored layer. ``params`` are the local attribute names of its target parameters
    (those that exist and are not None), e.g. ``("weight", "bias")``."""

    name: str
    module: nn.Module
    kind: str
    params: Tuple[str, ...]

    def param(self, local: str) -> torch.Tensor:
        return getattr(self.module, local)

    def qualified(self, local: str) -> str:
        return f"{self.name}.{local}" if self.name else local

    @property
    def layer_kind(self) -> LayerKind:
        """The :class:`~oba_ext.layers.LayerKind` record of this layer's kind."""
        return KINDS[self.kind]


def _spec(name: str, module: nn.Module, kind: str) -> Optional[LayerSpec]:
    params = tuple(p for p in KIND_PARAMS[kind]
                   if isinstance(getattr(module, p, None), torch.Tensor))
    if not params:
        return None
    return LayerSpec(name, module, kind, params)


def find_layers(model: nn.Module, targets: Optional[Iterable[str]] = None,
                ignore: Iterable = (), include_norm: bool = False) -> Dict[str, LayerSpec]:
    """Resolve the target layers of ``model``.

    targets: qualified module names to score (default: every module of a target kind:
        Linear, Conv1d/2d, ConvTranspose1d/2d, Embedding, MultiheadAttention, transformers'
        Conv1D once transformers is imported). A name
        that is not a module of the model, or whose module is not a supported target layer,
        raises ``ValueError`` naming it.
    ignore: module names or module objects to leave out (and their submodules' names).
    include_norm: also return BN/LN/GN layers (kind "norm"), for criteria that score them.
    Raises ``ValueError`` when no target layer is left.
    """
    modules = dict(model.named_modules())
    ignore = list(ignore)
    ignored_names = {i for i in ignore if isinstance(i, str)}
    ignored_ids = {id(i) for i in ignore if isinstance(i, nn.Module)}
    for name in ignored_names:
        if name not in modules:
            raise ValueError(f"ignore: {name!r} is not a module of the model")

    def is_ignored(name: str, mod: nn.Module) -> bool:
        if id(mod) in ignored_ids or name in ignored_names:
            return True
        return any(name.startswith(i + ".") for i in ignored_names if i)

    out: Dict[str, LayerSpec] = {}
    if targets is not None:
        if isinstance(targets, str):
            targets = [targets]
        for name in targets:
            if name not in modules:
                raise ValueError(f"targets: {name!r} is not a module of the model "
                                 f"(see model.named_modules())")
            mod = modules[name]
            kind = lookup_kind(mod) or (lookup_kind(mod, NORM_KINDS) if include_norm else None)
            if kind is None:
                raise ValueError(f"targets: module {name!r} is a {type(mod).__name__}, not a "
                                 f"target layer (one of {[c.__name__ for c in LAYER_KINDS]})")
            spec = _spec(name, mod, kind)
            if spec is not None and not is_ignored(name, mod):
                out[name] = spec
    else:
        for name, mod in modules.items():
            kind = lookup_kind(mod)
            if kind is None and include_norm:
                kind = lookup_kind(mod, NORM_KINDS)
            if kind is None or is_ignored(name, mod):
                continue
            spec = _spec(name, mod, kind)
            if spec is not None:
                out[name] = spec
    out = _drop_tied(out, explicit=targets is not None)
    if targets is None:
        _warn_unscored(modules, out, is_ignored)
    if not any(s.kind != "norm" for s in out.values()):
        raise ValueError(f"model: {type(model).__name__} has no target layers to score "
                         f"({'/'.join(c.__name__ for c in LAYER_KINDS)}), after targets={targets!r} "
                         f"and ignore={ignore!r}")
    return out


def _warn_unscored(modules, out, is_ignored) -> None:
    """Say which leaf modules hold weight matrices/kernels (a parameter with ≥ 2 dims) but are
    not of a target kind, so they are silently held fixed and get no scores (nn.Conv3d,
    nn.LSTM, nn.Bilinear, ...)."""
    scored = {id(p) for s in out.values() for p in s.module.parameters()}
    unscored = []
    for name, mod in modules.items():
        if (name in out or next(mod.children(), None) is not None or is_ignored(name, mod)
                or lookup_kind(mod, NORM_KINDS) is not None):
            continue
        if any(p.dim() >= 2 and id(p) not in scored for p in mod.parameters(recurse=False)):
            unscored.append(f"{name} ({type(mod).__name__})")
    if unscored:
        shown = ", ".join(unscored[:8]) + (f", ... ({len(unscored)} in all)"
                                            if len(unscored) > 8 else "")
        warnings.warn(f"oba_ext: modules with weights that are not target layers are held fixed "
                      f"and not scored: {shown}; target kinds: "
                      f"{sorted({c.__name__ for c in LAYER_KINDS})}", stacklevel=3)


def _drop_tied(out: Dict[str, LayerSpec], explicit: bool) -> Dict[str, LayerSpec]:
    """Tied weights (an LM head sharing its embedding's matrix): a parameter is moved once, so it
    is scored once, under the first layer (module order) that owns it. A later layer sharing a
    target parameter is left out with a warning naming both — the engine then refuses the model
    (the shared weight is used outside its scored layer) and ``impl="auto"`` falls back to the
    reference path, which moves the tied parameter in all its uses. Asking for both layers in
    ``targets`` raises ``ValueError``."""
    owner: Dict[int, str] = {}
    kept: Dict[str, LayerSpec] = {}
    for name, spec in out.items():
        if spec.kind == "norm":
            kept[name] = spec
            continue
        tied = [(p, owner[id(spec.param(p))]) for p in spec.params if id(spec.param(p)) in owner]
        if tied:
            p, first = tied[0]
            msg = (f"{name}.{p} is tied to a parameter of target layer {first!r} (shared "
                   f"weights are one parameter, moved and scored once)")
            if explicit:
                raise ValueError(f"targets: {msg}; list only one of {first!r} and {name!r}")
            warnings.warn(f"oba_ext: {msg}: scoring it under {first!r}, leaving {name!r} out",
                          stacklevel=3)
            continue
        for p in spec.params:
            owner[id(spec.param(p))] = name
        kept[name] = spec
    return kept


def target_parameters(layers: Dict[str, LayerSpec]) -> Dict[str, torch.Tensor]:
    """Qualified name -> parameter, for every target parameter of every non-norm layer (θ)."""
    return {s.qualified(p): s.param(p) for s in layers.values() if s.kind != "norm"
            for p in s.params}
