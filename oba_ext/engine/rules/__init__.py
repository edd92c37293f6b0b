"""Per-op rules of the two-stream sweep (SPEC §3), and the registry that finds them.

Rule API (what a new rule provides — one file plus a registry entry)
-------------------------------------------------------------------
A rule is an object with two methods::

    forward(call, ctx) -> (y, t_y)
    backward(ctx, g, c) -> [ (g_i, c_i) or None  for each tensor input i of the call ]

``call`` (:class:`Call`) holds the node's real inputs: ``call.inputs`` (tensor leaves of the
args/kwargs, in flatten order), ``call.tangents`` (their tangents ``T``, ``None`` = zero),
``call.needs`` (whether input i needs a cotangent), ``call.args`` / ``call.kwargs`` (with the
values substituted), ``call.module`` (for module calls), ``call.fn`` (the callable) and
``call.rebuild(new_inputs)`` -> ``(args, kwargs)`` with the tensor leaves replaced.
``ctx`` is a per-node namespace: the rule saves what backward needs on it (and nothing more).
The sweep sets, before backward:

- ``ctx.mode``: "oba" or "exact" (second stream ``C`` wanted), or ``None`` (first order only:
  ``c`` is always ``None`` and the rule returns ``c_i = None``);
- ``ctx.exact``: ``ctx.mode == "exact"`` — add the op's own second-order term
  (e.g. ``σ''(a)·T_a·G``), which ``oba`` leaves out unless the op is a bilinear product;
- ``ctx.tangents``: whether the forward carried tangents at all;
- ``ctx.layer``: the scored layer name for target/norm modules (else ``None``), and
  ``ctx.record(quantity, key, tensor)`` to add a score (accumulates: weight sharing sums);
- ``ctx.keys``, ``ctx.first``: requested keys and whether "taylor" is wanted.

Optionally a rule has ``capture_check(node, module) -> reason or None``, called once at
capture: a reason makes capture raise ``CaptureError`` (e.g. alpha dropout in train mode), so
``impl="auto"`` falls back to the reference path. The reason is a message, or a
:class:`oba_ext.errors.RefusedError` when the reference path refuses the same cause (then
``impl="kernel"`` raises a ``RefusedError`` too, not a plain ``RuntimeError``).

``None`` for a tangent or cotangent means zero; rules exploit it to skip work, and return
``None`` rather than a tensor of zeros. Rules on the hot path return their two streams as the
halves of one buffer when they can, so the next Linear/Conv stacks them without a copy
(:mod:`.pairs`; an optimization, never an assumption). ``g`` may be ``None`` only when nothing downstream
reached the node (the sweep then skips the rule). Rules never modify their inputs in place.

Registry: :data:`MODULE_RULES` (module class, looked up along the MRO),
:data:`FUNCTION_RULES` (function object: ``torch.relu``, ``operator.add``, ...),
:data:`METHOD_RULES` (tensor-method name: ``"view"``, ``"relu"``, ...). :func:`lookup`
returns the rule for an fx node or ``None`` (the sweep then uses the generic rule,
:mod:`.generic`, with a one-time warning). The generic rule is exact for ``taylor`` and
``exact``; for ``oba`` it is used only for ops on its allow-list (no product of two θ-dependent
values inside) — any other op without a rule is refused by name when an ``oba`` scorer is built
(``build_scorer(..., quantities)``) and at run time. Ops that hide products (GLU, addcmul,
nn.Bilinear, LSTM/GRU, …) have rules that write them out (:mod:`.products`). Values that are
not floating point carry no streams (:mod:`.discrete`). :data:`UNSUPPORTED` lists ops refused
in every mode.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ... import _lazy

MODULE_RULES: Dict[type, Any] = {}
FUNCTION_RULES: Dict[Any, Any] = {}
METHOD_RULES: Dict[str, Any] = {}

#: ops that cannot be scored by the engine at all (a rule refuses them, or none exists and the
#: generic rule would be wrong in every mode): capture refuses them by name. Ops with hidden
#: products now have rules (:mod:`.products`); ops without a rule that are not on the generic
#: rule's oba allow-list are refused per run kind (:func:`.generic.program_refusal`).
UNSUPPORTED: Dict[Any, str] = {}


def _registrar(table: Dict, keys):
    """A decorator ``deco(rule) -> rule`` storing ``rule`` under each of ``keys`` in ``table``
    (a later registration of the same key replaces the earlier one)."""
    def deco(rule):
        for k in keys:
            table[k] = rule
        return rule
    return deco


def register_module(*classes):
    """``register_module(nn.Conv1d, ...)(rule)``: the rule of these module classes (and of
    subclasses that keep their ``forward``, :func:`module_rule`)."""
    return _registrar(MODULE_RULES, classes)


#: (module path, class name, rule) for classes of optional packages, registered by
#: :func:`register_module_lazy` once the user has imported that module
_LAZY_MODULE_RULES: List[Any] = []


def register_module_lazy(module_path: str, class_name: str):
    """Like :func:`register_module` for a class of an optional package (e.g. transformers'
    ``Conv1D``): it joins :data:`MODULE_RULES` once ``module_path`` has been imported."""
    def deco(rule):
        _LAZY_MODULE_RULES.append((module_path, class_name, rule))
        return rule
    return deco


def _resolve_lazy_rules() -> None:
    if _LAZY_MODULE_RULES:
        _lazy.resolve(_LAZY_MODULE_RULES, MODULE_RULES)


def register_function(*fns):
    """``register_function(torch.relu, F.relu, ...)(rule)``: the rule of these functions."""
    return _registrar(FUNCTION_RULES, fns)


def register_method(*names):
    """``register_method("relu", ...)(rule)``: the rule of these tensor-method names."""
    return _registrar(METHOD_RULES, names)


def module_rule(module: nn.Module):
    """The rule of the nearest registered class along the MRO — only if the module still runs
    that class's ``forward`` (a subclass that overrides it, e.g. torchvision's LayerNorm2d
    permuting around nn.LayerNorm, is traced through instead)."""
    _resolve_lazy_rules()
    for cls in type(module).__mro__:
        r = MODULE_RULES.get(cls)
        if r is not None:
            return r if type(module).forward is cls.forward else None
    return None


def unsupported_reason(node, modules) -> Optional[str]:
    if node.op == "call_module":
        for cls in type(modules[node.target]).__mro__:
            if cls in UNSUPPORTED and cls not in MODULE_RULES:
                return UNSUPPORTED[cls]
    elif node.op == "call_function":
        try:
            if node.target in UNSUPPORTED and node.target not in FUNCTION_RULES:
                return UNSUPPORTED[node.target]
        except TypeError:  # unhashable target
            return None
    return None


def lookup(node, modules):
    """The registered rule for fx ``node`` (or ``None``)."""
    if node.op == "call_module":
        return module_rule(modules[node.target])
    if node.op == "call_function":
        try:
            return FUNCTION_RULES.get(node.target)
        except TypeError:
            return None
    if node.op == "call_method":
        return METHOD_RULES.get(node.target)
    return None


class Call:
    """One execution of an fx node with real values (see the module docstring)."""

    __slots__ = ("node", "module", "fn", "args", "kwargs", "inputs", "tangents", "needs",
                 "_spec", "_leaves", "_slots")

    def __init__(self, node, module, fn, args, kwargs, leaves, spec, slots, tangents, needs):
        self.node = node
        self.module = module
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self._leaves = leaves
        self._spec = spec
        self._slots = slots
        self.inputs: List[torch.Tensor] = [leaves[i] for i in slots]
        self.tangents = tangents
        self.needs = needs

    @property
    def positions(self):
        """Index of each tensor input among the flattened (args, kwargs) leaves."""
        return self._slots

    def rebuild(self, new_inputs):
        """(args, kwargs) with tensor input i replaced by ``new_inputs[i]``."""
        leaves = list(self._leaves)
        for i, v in zip(self._slots, new_inputs):
            leaves[i] = v
        return pytree.tree_unflatten(leaves, self._spec)

    def invoke(self, new_inputs):
        args, kwargs = self.rebuild(new_inputs)
        return self.fn(*args, **kwargs)


def _load():
    # importing the rule files fills the registries
    from . import arith, attention, conv, elementwise, linear, meta, norm, pool, shape  # noqa: F401
    from . import discrete, products, random  # noqa: F401  (after shape: they override it)


__all__ = ["register_module_lazy", "MODULE_RULES", "FUNCTION_RULES", "METHOD_RULES", "UNSUPPORTED", "Call", "lookup",
           "register_module", "register_function", "register_method", "operator"]
