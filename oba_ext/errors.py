"""The errors oba_ext raises for what it refuses, shared by every path (no dependencies, so the
engine, the reference path and the front ends all import it at module level).

:class:`RefusedError` — a model, module, op or argument that a path cannot score, refused by
name (SPEC §8). The same cause raises the same class on every path that refuses it: the
reference path, the engine (under ``impl="kernel"`` its message starts ``impl='kernel':``) and
``impl="auto"``. Before, one cause could raise ``ValueError`` on one path, ``RuntimeError`` or
``NotImplementedError`` on another; :class:`RefusedError` is all three (a ``ValueError`` and a
``NotImplementedError``, hence a ``RuntimeError``), so ``except`` clauses written for any of
them keep working. Subclasses: :class:`oba_ext.reference.functions.UnsupportedFunctionError`
(a custom ``autograd.Function`` lacking what the kind needs).

What the engine alone cannot run while the reference path can (a model fx cannot trace, module
hooks, a tied target weight, attention weights feeding the loss) is not a refusal of the model:
``impl="auto"`` falls back to the reference path with a warning and ``impl="kernel"`` raises a
plain ``RuntimeError`` saying why.

:class:`EmptyBatchError` — a batch with nothing to average over (SPEC §8).
"""
from __future__ import annotations


class RefusedError(ValueError, NotImplementedError):
    """What a path cannot score, refused by name; the same class on every path (module
    docstring). A ``ValueError``, a ``NotImplementedError`` and a ``RuntimeError``."""


class EmptyBatchError(ValueError):
    """A batch with nothing to average over (SPEC §8: empty batches are an error, never a batch
    of weight zero that shifts the average). Raised by :func:`oba_ext.score`, :func:`oba_ext.hvp`
    and everything built on them, on every path; the message names the batch index and the
    empty input, or says that the loss averaged over zero elements."""


__all__ = ["RefusedError", "EmptyBatchError"]
