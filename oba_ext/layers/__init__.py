"""Layer kinds: one :class:`LayerKind` per kind of scored module, one file per kind.

Every consumer reads :data:`KINDS` (by kind name) or :func:`kind_of` (by module):
target-layer discovery (:mod:`oba_ext.targets`), the engine's sweep, the reference path's
channel reductions, the Torch-Pruning importance, head layouts and reports.

Adding a kind: a file here defining ``KINDS = (LayerKind(...),)`` (its module types, target
parameters, score keys and shapes, reductions, Torch-Pruning handlers), listed in
:data:`_KIND_FILES`, plus its engine rule in :mod:`oba_ext.engine.rules` (and kernels, if any).
A kind for a class of an optional package names it in ``lazy_types`` (see
:func:`resolve_lazy`): ``hf_conv1d`` (Hugging Face ``transformers.Conv1D``) is one.
"""
from __future__ import annotations

import importlib
from typing import Dict, List, Optional, Tuple

from torch import nn

from .. import _lazy
from .base import HeadGroup, LayerKind, weight_in, weight_out

#: the files of this package that define kinds, in lookup order
_KIND_FILES = ("dense", "mha", "norm", "conv_transpose", "embedding", "hf_conv1d")

#: kind name -> LayerKind
KINDS: Dict[str, LayerKind] = {}
#: module class -> LayerKind (looked up along the module's MRO)
MODULE_KINDS: Dict[type, LayerKind] = {}
#: (module path, class name, kind) of lazy types whose module has not been imported yet
_LAZY: List[Tuple[str, str, LayerKind]] = []


def register(kind: LayerKind) -> LayerKind:
    """Add ``kind`` to :data:`KINDS` and its module types to :data:`MODULE_KINDS`."""
    if kind.name in KINDS:
        raise ValueError(f"layer kind {kind.name!r} is already registered")
    for cls in kind.module_types:
        if cls in MODULE_KINDS:
            raise ValueError(f"{cls.__name__} already belongs to layer kind "
                             f"{MODULE_KINDS[cls].name!r}")
    KINDS[kind.name] = kind
    for cls in kind.module_types:
        MODULE_KINDS[cls] = kind
    _LAZY.extend((mod, cls, kind) for mod, cls in kind.lazy_types)
    return kind


def resolve_lazy() -> None:
    """Add to :data:`MODULE_KINDS` the ``lazy_types`` whose defining module is imported now
    (a model holding such a module can only exist once it is). Called by every lookup."""
    if _LAZY:
        _lazy.resolve(_LAZY, MODULE_KINDS)


def kind_of(module: nn.Module, include_norm: bool = True) -> Optional[LayerKind]:
    """The kind of ``module`` (first class along its MRO with a kind), or None.
    ``include_norm=False``: only target kinds (normalization layers give None)."""
    resolve_lazy()
    for cls in type(module).__mro__:
        k = MODULE_KINDS.get(cls)
        if k is not None:
            return k if (k.target or include_norm) else None
    return None


for _f in _KIND_FILES:
    for _k in importlib.import_module(f"{__name__}.{_f}").KINDS:
        register(_k)

__all__ = ["LayerKind", "HeadGroup", "KINDS", "MODULE_KINDS", "register", "kind_of", "resolve_lazy",
           "weight_out", "weight_in"]
