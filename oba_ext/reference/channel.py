"""Pure-PyTorch twins of :mod:`oba_ext.ops.channel` (same names, same signatures).

Written independently of the kernels (csrc/*/channel.*): elementwise products in the input
dtype, then ``torch.sum`` over every dim but ``channel_dim`` accumulating in the output dtype.

    second[k] = Σ a ⊙ (b − d) + c ⊙ d   (b None ≡ 0),     first[k] = Σ a ⊙ d
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["channel_score_reduce", "channel_score_reduce_add_"]


def _reduce_all_but(x: Tensor, channel_dim: int, dtype: torch.dtype) -> Tensor:
    dims = [i for i in range(x.dim()) if i != channel_dim]
    if not dims:  # 1-D input: nothing to reduce (sum(dim=[]) would reduce everything)
        return x.to(dtype)
    return x.sum(dim=dims, dtype=dtype)


def channel_score_reduce(a: Tensor, b: Optional[Tensor], c: Tensor, d: Tensor,
                         channel_dim: int) -> Tuple[Tensor, Tensor]:
    """``(Σ a⊙(b−d) + c⊙d, Σ a⊙d)`` per channel: two ``(C,)`` tensors (float64 for float64
    inputs, else float32)."""
    for name, t in (("b", b), ("c", c), ("d", d)):
        if t is not None and t.shape != a.shape:
            raise ValueError(f"channel_score_reduce: argument '{name}' must have the shape of 'a' "
                             f"{tuple(a.shape)}, got {tuple(t.shape)}")
    if a.dim() < 1:
        raise ValueError("channel_score_reduce: argument 'a' must be at least 1-D, got a scalar")
    if not -a.dim() <= channel_dim < a.dim():
        raise ValueError(f"channel_score_reduce: argument 'channel_dim' = {channel_dim} is out of "
                         f"range for a tensor with {a.dim()} dimensions")
    dim = channel_dim % a.dim()
    out_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    diff = -d if b is None else b - d
    second = _reduce_all_but(a * diff + c * d, dim, out_dtype)
    first = _reduce_all_but(a * d, dim, out_dtype)
    return second, first


def channel_score_reduce_add_(a: Tensor, b: Optional[Tensor], c: Tensor, d: Tensor, channel_dim: int,
                              second_acc: Tensor, first_acc: Tensor) -> None:
    """In place: ``second_acc += Σ a⊙(b−d) + c⊙d``, ``first_acc += Σ a⊙d`` per channel."""
    second, first = channel_score_reduce(a, b, c, d, channel_dim)
    n = second.shape[0]
    for name, acc in (("second_acc", second_acc), ("first_acc", first_acc)):
        if acc.shape != (n,):
            raise ValueError(f"channel_score_reduce_add_: argument '{name}' must be 1-D of length "
                             f"{n}, got shape {tuple(acc.shape)}")
    second_acc.add_(second.to(second_acc.dtype))
    first_acc.add_(first.to(first_acc.dtype))
