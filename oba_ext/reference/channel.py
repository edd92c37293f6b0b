"""Pure-PyTorch twins of :mod:`oba_ext.ops.channel` (same names, same signatures).

Written independently of the kernels (csrc/*/channel.*): the inputs are converted to the
output dtype (float64 for float64 inputs, else float32) first, so products and sums of
float16/bfloat16 inputs are float32 — the precision the kernels promise — then ``torch.sum``
over every dim but ``channel_dim``.

    second[k] = Σ a ⊙ (b − d) + c ⊙ d   (b None ≡ 0, c None ≡ 0),     first[k] = Σ a ⊙ d

Errors: ValueError naming the argument (shape mismatch, 0-d ``a``, ``channel_dim`` out of range,
accumulators of the wrong length).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["channel_score_reduce", "channel_score_reduce_add_", "channel_first_order_reduce"]


def _reduce_all_but(x: Tensor, channel_dim: int) -> Tensor:
    dims = [i for i in range(x.dim()) if i != channel_dim]
    if not dims:  # 1-D input: nothing to reduce (sum(dim=[]) would reduce everything)
        return x.clone()
    return x.sum(dim=dims)


def _prepare(fn: str, a: Tensor, others, channel_dim: int):
    for name, t in others:
        if t is not None and t.shape != a.shape:
            raise ValueError(f"{fn}: argument '{name}' must have the shape of 'a' "
                             f"{tuple(a.shape)}, got {tuple(t.shape)}")
    if a.dim() < 1:
        raise ValueError(f"{fn}: argument 'a' must be at least 1-D, got a scalar")
    if not -a.dim() <= channel_dim < a.dim():
        raise ValueError(f"{fn}: argument 'channel_dim' = {channel_dim} is out of "
                         f"range for a tensor with {a.dim()} dimensions")
    out_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    return channel_dim % a.dim(), out_dtype


def channel_score_reduce(a: Tensor, b: Optional[Tensor], c: Optional[Tensor], d: Tensor,
                         channel_dim: int) -> Tuple[Tensor, Tensor]:
    """``(Σ a⊙(b−d) + c⊙d, Σ a⊙d)`` per channel: two ``(C,)`` tensors (float64 for float64
    inputs, else float32; products in that dtype)."""
    dim, acc = _prepare("channel_score_reduce", a, (("b", b), ("c", c), ("d", d)), channel_dim)
    a, d = a.to(acc), d.to(acc)
    ad = a * d
    second = -ad if b is None else a * (b.to(acc) - d)
    if c is not None:
        second = second + c.to(acc) * d
    return _reduce_all_but(second, dim), _reduce_all_but(ad, dim)


def channel_first_order_reduce(a: Tensor, d: Tensor, channel_dim: int) -> Tensor:
    """``Σ a⊙d`` per channel: ``(C,)`` (float64 for float64 inputs, else float32)."""
    dim, acc = _prepare("channel_first_order_reduce", a, (("d", d),), channel_dim)
    return _reduce_all_but(a.to(acc) * d.to(acc), dim)


def channel_score_reduce_add_(a: Tensor, b: Optional[Tensor], c: Optional[Tensor], d: Tensor,
                              channel_dim: int, second_acc: Tensor, first_acc: Tensor) -> None:
    """In place: ``second_acc += Σ a⊙(b−d) + c⊙d``, ``first_acc += Σ a⊙d`` per channel."""
    second, first = channel_score_reduce(a, b, c, d, channel_dim)
    n = second.shape[0]
    for name, acc in (("second_acc", second_acc), ("first_acc", first_acc)):
        if acc.shape != (n,):
            raise ValueError(f"channel_score_reduce_add_: argument '{name}' must be 1-D of length "
                             f"{n}, got shape {tuple(acc.shape)}")
    second_acc.add_(second.to(second_acc.dtype))
    first_acc.add_(first.to(first_acc.dtype))
