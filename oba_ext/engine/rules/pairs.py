"""Batch-stacked stream pairs without copies.

Linear/Conv run one GEMM/conv on ``[X; T]`` (forward) and ``[G; C]`` (backward) stacked along
the batch. When a rule produces its two streams as the two halves of one freshly allocated
``(2N, ...)`` buffer, the next Linear/Conv can use that buffer as is instead of ``torch.cat``
(measured on resnet18/CPU: the cats were ~13% of the sweep). Rules on the hot path (Linear/
Conv, eval-mode BN, ReLU/ReLU6, residual add, cotangent accumulation) keep their outputs
paired; any other rule may return two unrelated tensors — pairing is an optimization, never
an assumption (:func:`stack_pair` falls back to ``torch.cat``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def as_pair(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """The ``(2N, ...)`` tensor whose halves are ``a`` and ``b`` if they are adjacent
    contiguous halves of one storage (``b`` right after ``a``), else ``None``."""
    if not (isinstance(a, Tensor) and isinstance(b, Tensor)):  # None, or the per-element
        return None  # cotangent lists of a tuple-valued node (unbind, split, MHA's outputs)
    if a.dim() == 0 or a.shape != b.shape or a.dtype != b.dtype:
        return None
    if not (a.is_contiguous() and b.is_contiguous()):
        return None
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return None
    if b.storage_offset() != a.storage_offset() + a.numel():
        return None
    shape = (2 * a.shape[0],) + tuple(a.shape[1:])
    return a.as_strided(shape, torch.empty(shape, device="meta").stride(), a.storage_offset())


def stack_pair(a: Tensor, b: Tensor) -> Tensor:
    """``torch.cat([a, b])``, without the copy when they are already paired."""
    p = as_pair(a, b)
    return p if p is not None else torch.cat([a, b], 0)


def halves(s: Tensor):
    n = s.shape[0] // 2
    return s[:n], s[n:]


def new_pair(like: Tensor) -> Tensor:
    """An uninitialised ``(2N, ...)`` buffer for two streams shaped like ``like``."""
    return like.new_empty((2 * like.shape[0],) + tuple(like.shape[1:]))
