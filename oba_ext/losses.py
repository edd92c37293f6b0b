"""The default loss and the scalar-loss check shared by :func:`oba_ext.score`, the engine's
loss node (:mod:`oba_ext.engine.loss` registers its cross-entropy rule for
:func:`default_loss`) and :mod:`oba_ext.curvature`. Depends on torch only, so every one of them
imports it at module level without a cycle."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def default_loss(outputs, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy, the default ``loss_fn``: ``outputs`` a ``(B, K)`` tensor of logits,
    or an object with a ``logits`` tensor field (a Hugging Face ``ModelOutput``)."""
    if not isinstance(outputs, torch.Tensor) and isinstance(getattr(outputs, "logits", None),
                                                            torch.Tensor):
        outputs = outputs.logits
    if not isinstance(outputs, torch.Tensor):
        raise TypeError(f"loss_fn: the default cross-entropy needs the model to return a tensor "
                        f"of logits (or an object with a .logits tensor), got "
                        f"{type(outputs).__name__}; pass loss_fn=...")
    return nn.functional.cross_entropy(outputs, targets)


def checked_loss(loss_fn: Callable) -> Callable:
    """Wrap ``loss_fn`` so that a non-scalar loss raises a clear ``ValueError``."""
    def wrapped(outputs, targets):
        loss = loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn: must return a scalar tensor (e.g. a mean over the batch), "
                             f"got {shape}")
        return loss
    wrapped.__wrapped__ = loss_fn
    return wrapped
