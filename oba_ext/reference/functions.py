"""Custom ``torch.autograd.Function`` s in a user's model (SPEC §8): what each score kind needs
from them, and clear refusals where a Function does not provide it.

The model's derivatives are what its Functions say:

- ``taylor`` (and every ``G`` stream) uses the Function's ``backward``;
- forward tangents (``oba``, ``exact``: ``T`` of SPEC §3, the Φ-oracle's operand tangents)
  need its ``jvp``;
- ``exact`` differentiates the ``backward`` once more (double backward), so the backward must
  be differentiable: not ``@once_differentiable``, and not computed outside autograd.

A Function is one elementary op for ``oba``: it is linearized by its own ``jvp``/``backward``,
and products computed inside its ``forward`` are not seen as OBA products (the Function hides
them; both paths agree on this).

What cannot be detected: a ``backward`` that stays on the autograd graph through the incoming
gradient but hides part of its dependence on the saved inputs (e.g. ``2 * x.detach() * g``);
its second derivative is what that graph says.
"""
from __future__ import annotations

import contextlib
from typing import List

import torch
from torch.autograd.function import BackwardCFunction, Function, once_differentiable

from ..errors import RefusedError


#: torch's own Functions that only restructure autograd (derivative-transparent): traced into,
#: as before, and not opaque to the Φ-oracle's recorder
TRANSPARENT = {"torch.utils.checkpoint.CheckpointFunction"}


def is_transparent(cls) -> bool:
    return function_name(cls) in TRANSPARENT


class UnsupportedFunctionError(RefusedError):
    """A custom autograd.Function lacks what the requested score kind needs (the message names
    the Function and what it lacks). A :class:`oba_ext.errors.RefusedError`, so still a
    ``NotImplementedError``."""


_ONCE_CODE = once_differentiable(lambda ctx, *g: g).__code__


def function_name(cls) -> str:
    return f"{getattr(cls, '__module__', '?')}.{getattr(cls, '__qualname__', cls)}"


def has_jvp(cls) -> bool:
    """Whether ``cls`` overrides ``Function.jvp`` (forward-mode AD through it)."""
    return getattr(cls, "jvp", None) is not Function.jvp


def is_once_differentiable(cls) -> bool:
    return getattr(getattr(cls, "backward", None), "__code__", None) is _ONCE_CODE


def no_jvp_error(cls, kind: str = "oba") -> UnsupportedFunctionError:
    return UnsupportedFunctionError(
        f"custom autograd.Function {function_name(cls)} has no jvp: kind {kind!r} carries forward "
        f"tangents (SPEC §3) through it, which needs the Function's forward-mode derivative. "
        f"Define the staticmethod jvp(ctx, *tangents) (saving what it needs with "
        f"ctx.save_for_forward), or use kind='taylor' (which only needs its backward)")


def not_twice_differentiable_error(cls, why: str) -> UnsupportedFunctionError:
    return UnsupportedFunctionError(
        f"custom autograd.Function {function_name(cls)}: its backward {why}, so kind 'exact' "
        f"cannot differentiate it again (the Hessian needs a double backward). Write the "
        f"backward with differentiable torch ops (no @once_differentiable, no .detach()/numpy), "
        f"or use kind='oba' or 'taylor'")


def is_error_node(t: torch.Tensor) -> bool:
    """``t`` came out of a ``@once_differentiable`` backward under ``create_graph``."""
    fn = t.grad_fn
    return fn is not None and type(fn).__name__ in ("Error", "DelayedError")


def custom_function_nodes(*roots: torch.Tensor) -> List[BackwardCFunction]:
    """The autograd nodes of custom Functions reachable from ``roots`` (each node once)."""
    stack = [r.grad_fn for r in roots if isinstance(r, torch.Tensor) and r.grad_fn is not None]
    seen, out = set(), []
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n, BackwardCFunction):
            out.append(n)
        stack.extend(f for f, _ in n.next_functions)
    return out


@contextlib.contextmanager
def checked_double_backward(loss: torch.Tensor):
    """While active, a first ``torch.autograd.grad(..., create_graph=True)`` from ``loss``
    raises :class:`UnsupportedFunctionError` when a custom Function's backward leaves the
    graph (``@once_differentiable``, or results that do not require grad although the incoming
    gradient does): double backward through it would silently drop its terms."""
    nodes = custom_function_nodes(loss)
    handles = []
    bad: List[BaseException] = []

    def make_hook(node):
        cls = node._forward_cls

        def hook(grad_inputs, grad_outputs):
            incoming = any(isinstance(g, torch.Tensor) and g.requires_grad for g in grad_outputs)
            for g in grad_inputs:
                if not isinstance(g, torch.Tensor):
                    continue
                if is_error_node(g) or is_once_differentiable(cls):
                    bad.append(not_twice_differentiable_error(cls, "is marked @once_differentiable"))
                    return
                if incoming and not g.requires_grad and bool(g.ne(0).any()):
                    bad.append(not_twice_differentiable_error(
                        cls, "returns a gradient that is not on the autograd graph (detached, or "
                             "computed outside torch)"))
                    return
        return hook

    for n in nodes:
        handles.append(n.register_hook(make_hook(n)))
    try:
        yield bad
    finally:
        for h in handles:
            h.remove()
    if bad:
        raise bad[0]


@contextlib.contextmanager
def opaque_functions(recorder):
    """While active, ``Fn.apply`` of every custom Function runs with ``recorder.opaque`` raised:
    the Φ-oracle's recorder neither records products nor decomposes ops inside a Function's
    forward (or its jvp, which forward-mode AD calls from ``apply``)."""
    orig = Function.__dict__["apply"]

    def apply(cls, *args, **kwargs):
        if is_transparent(cls):
            return orig.__get__(None, cls)(*args, **kwargs)
        recorder.opaque += 1
        try:
            return orig.__get__(None, cls)(*args, **kwargs)
        finally:
            recorder.opaque -= 1

    Function.apply = classmethod(apply)
    try:
        yield
    finally:
        Function.apply = orig


def diagnose_forward_ad(build_loss) -> None:
    """After forward-mode AD failed: rebuild the loss with autograd and raise
    :class:`UnsupportedFunctionError` naming the first custom Function without ``jvp``
    (returns quietly when there is none: the caller re-raises the original error)."""
    with torch.enable_grad():
        loss = build_loss()
    for n in custom_function_nodes(loss):
        if not has_jvp(n._forward_cls):
            raise no_jvp_error(n._forward_cls)


__all__ = ["UnsupportedFunctionError", "function_name", "has_jvp", "is_once_differentiable",
           "no_jvp_error", "not_twice_differentiable_error", "custom_function_nodes",
           "checked_double_backward", "diagnose_forward_ad", "is_error_node", "opaque_functions"]
