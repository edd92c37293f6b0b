"""The default loss and the scalar-loss check shared by :func:`oba_ext.score`, the engine's
loss node (:mod:`oba_ext.engine.loss` registers its cross-entropy rule for
:func:`default_loss`) and :mod:`oba_ext.curvature`. Depends on torch only, so every one of them
imports it at module level without a cycle."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import EmptyBatchError  # noqa: F401  (raised here; defined with the other errors)


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


def _in_vmap(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.func.vmap`` at some level (its value cannot be read
    there; ``grad``/``jvp`` levels can be)."""
    f = torch._C._functorch
    while f.is_functorch_wrapped_tensor(t):
        if f.is_batchedtensor(t):
            return True
        t = f.get_unwrapped(t)
    return False


def check_loss_not_empty(loss: torch.Tensor, outputs) -> None:
    """:class:`EmptyBatchError` when the scalar ``loss`` is NaN although every floating tensor of
    the model's ``outputs`` is finite (vacuously so for outputs with no element): a mean-reduced
    loss over zero elements — sequences of length 0, a next-token loss on length-1 sequences,
    every target equal to ``ignore_index`` — is ``0/0``, and its gradient is zero, so the batch
    would silently count as a batch of zero scores. A NaN loss of NaN outputs is left to the
    score's own NaN check (``FloatingPointError`` naming the layer). Not checked inside
    ``torch.func.vmap`` (per-sample passes), where a value cannot be read."""
    if _in_vmap(loss) or not bool(torch.isnan(loss.detach())):
        return
    outs = [t for t in pytree.tree_leaves(outputs)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not outs and isinstance(getattr(outputs, "logits", None), torch.Tensor):
        outs = [outputs.logits]
    if not outs or any(_in_vmap(t) for t in outs):
        return
    if not all(bool(torch.isfinite(t.detach()).all()) for t in outs):
        return
    shapes = ", ".join(str(tuple(t.shape)) for t in outs[:4])
    raise EmptyBatchError(
        f"the loss is NaN although the model's outputs ({shapes}) are finite: a mean over zero "
        f"elements (empty sequences, or every target ignored); drop such batches before "
        f"scoring (SPEC §8: an empty batch is an error, not a batch of zero scores)")


def checked_loss(loss_fn: Callable) -> Callable:
    """Wrap ``loss_fn`` so that a non-scalar loss raises a clear ``ValueError``, and a loss that
    averaged over zero elements raises :class:`EmptyBatchError` (:func:`check_loss_not_empty`)."""
    def wrapped(outputs, targets):
        loss = loss_fn(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn: must return a scalar tensor (e.g. a mean over the batch), "
                             f"got {shape}")
        check_loss_not_empty(loss, outputs)
        return loss
    wrapped.__wrapped__ = loss_fn
    return wrapped
