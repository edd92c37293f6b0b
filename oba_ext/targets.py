"""Which modules are scored, and how their parameters map to channels.

The layer-kind table :data:`LAYER_KINDS` is the one place that says which module types are
target layers (SPEC §1). Lookup walks the module's MRO through the dict, so subclasses of
``nn.Linear`` (e.g. ``NonDynamicallyQuantizableLinear``) resolve without isinstance chains.
``NORM_KINDS`` lists normalization layers, scored only by criteria that ask for them
(the Jacobian Criterion scores BN/LN channels, SPEC §6).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
from torch import nn

#: module type -> layer kind. Target layers: their weights and biases form θ (SPEC §1).
LAYER_KINDS: Dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv",
    nn.Conv2d: "conv",
    nn.MultiheadAttention: "mha",
}

#: normalization layers: never moved by δθ, scored only by criteria with ``norm_layers=True``.
NORM_KINDS: Dict[type, str] = {
    nn.BatchNorm1d: "norm",
    nn.BatchNorm2d: "norm",
    nn.LayerNorm: "norm",
    nn.GroupNorm: "norm",
}

#: parameter names (on the module itself) that are target parameters, per layer kind
KIND_PARAMS: Dict[str, Tuple[str, ...]] = {
    "linear": ("weight", "bias"),
    "conv": ("weight", "bias"),
    "mha": ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
    "norm": ("weight", "bias"),
}


def lookup_kind(module: nn.Module, table: Dict[type, str] = LAYER_KINDS) -> Optional[str]:
    """The kind of ``module`` from ``table`` (first match along its MRO), or None."""
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


def _spec(name: str, module: nn.Module, kind: str) -> Optional[LayerSpec]:
    params = tuple(p for p in KIND_PARAMS[kind]
                   if isinstance(getattr(module, p, None), torch.Tensor))
    if not params:
        return None
    return LayerSpec(name, module, kind, params)


def find_layers(model: nn.Module, targets: Optional[Iterable[str]] = None,
                ignore: Iterable = (), include_norm: bool = False) -> Dict[str, LayerSpec]:
    """Resolve the target layers of ``model``.

    targets: qualified module names to score (default: every Linear/Conv/MHA layer). A name
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
    if not any(s.kind != "norm" for s in out.values()):
        raise ValueError(f"model: {type(model).__name__} has no target layers to score "
                         f"(Linear/Conv1d/Conv2d/MultiheadAttention), after targets={targets!r} "
                         f"and ignore={ignore!r}")
    return out


def target_parameters(layers: Dict[str, LayerSpec]) -> Dict[str, torch.Tensor]:
    """Qualified name -> parameter, for every target parameter of every non-norm layer (θ)."""
    return {s.qualified(p): s.param(p) for s in layers.values() if s.kind != "norm"
            for p in s.params}
