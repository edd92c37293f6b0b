"""What the ``inputs`` of a batch may be, in one place (scoring, the engine and the reference
path all call the model through :func:`call_args`).

A batch is ``(inputs, targets)`` and ``inputs`` is one of:

- a tensor ``x``                          → ``model(x)``
- a tuple or list of positional values    → ``model(*inputs)``
- a dict (any ``Mapping``) of keywords    → ``model(**inputs)``, the way Hugging Face models
  are called: ``({"input_ids": ids, "attention_mask": mask}, labels)``

Values are usually tensors; other values (``None``, flags) are passed through unchanged.
The first tensor found (in positional order, or in the dict's order) carries the batch
dimension where a criterion needs the number of samples (:func:`batch_size`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Dict, Tuple

import torch

__all__ = ["call_args", "batch_size", "describe"]


def call_args(inputs) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """``(args, kwargs)`` such that the model is called as ``model(*args, **kwargs)``.

    Raises ``TypeError`` for a dict with a key that is not a string (it cannot be a keyword).
    """
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise TypeError(f"inputs: a dict of keyword inputs needs string keys (parameter "
                            f"names of the model's forward), got key {bad[0]!r}")
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def batch_size(inputs) -> int:
    """Number of samples of one batch: ``shape[0]`` of the first tensor of ``inputs``.

    Raises ``ValueError`` when ``inputs`` holds no tensor with a batch dimension.
    """
    args, kwargs = call_args(inputs)
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            if v.dim() == 0:
                break
            return int(v.shape[0])
    raise ValueError(f"batches: a per-sample-mean criterion needs inputs with a batch dimension "
                     f"(the first tensor's dim 0); got {describe(inputs)}")


def describe(inputs) -> str:
    """A short description of ``inputs`` for error messages (types and shapes, no values)."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)}"
        return type(v).__name__
    args, kwargs = call_args(inputs)
    if kwargs:
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in kwargs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(one(v) for v in args) + ")"
    return one(inputs)
