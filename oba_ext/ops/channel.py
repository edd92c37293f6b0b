"""Typed wrappers of the per-channel score kernels (``torch.ops.oba_ext.channel_*``).

SPEC §5 structured scores, reducing over every dim but ``channel_dim``:

    second[k] = Σ a ⊙ (b − d) + c ⊙ d        (b None ≡ 0, c None ≡ 0)
    first[k]  = Σ a ⊙ d

- out-channel scores of a target layer: ``a=G, b=T_Y, c=C, d=Y``  (Y: layer output, bias included)
- in-channel scores: ``a=G_X, b=T_X, c=C_X, d=X``
- ``first`` is the first-order (Taylor) sum; :func:`channel_first_order_reduce` computes it
  alone (one product per element, two inputs read).

All tensors share one shape (e.g. ``(N, C, H, W)`` in any memory format, ``(N, T, C)``,
``(N, C)``, ``(N, C, L)``) and dtype (float32/float64/float16/bfloat16). Results are ``(C,)``,
float64 for float64 inputs, else float32. Precision: every input is converted to the
accumulation type before any product — float64 on the CPU; float32 on CUDA for
float16/bfloat16/float32 inputs (float64 for float64) — so no product or sum is rounded to 16 bits.
The CUDA kernels use no tensor cores, so TF32 settings do not affect them. The pure-PyTorch
twins with the same names live in :mod:`oba_ext.reference.channel`.

Errors (RuntimeError): the compiled extension is not loaded; tensors of another shape, dtype or
device than ``a``; ``channel_dim`` out of range; a 0-d ``a``; accumulators of the wrong length,
dtype or device.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext

__all__ = ["channel_score_reduce", "channel_score_reduce_add_", "channel_first_order_reduce"]


def channel_score_reduce(a: Tensor, b: Optional[Tensor], c: Optional[Tensor], d: Tensor,
                         channel_dim: int) -> Tuple[Tensor, Tensor]:
    """``(second, first)`` per channel of ``channel_dim``: ``Σ a⊙(b−d) + c⊙d`` and ``Σ a⊙d``.

    Args: a, b (or None ≡ 0), c (or None ≡ 0), d: same shape/dtype/device; channel_dim: the
    channel dim (may be negative). Returns two ``(C,)`` tensors (float64 for float64 inputs, else
    float32). Raises RuntimeError when the compiled extension is not loaded or an argument is
    invalid (named in the message).
    """
    _ext.require("channel_score_reduce")
    return torch.ops.oba_ext.channel_score_reduce.default(a, b, c, d, channel_dim)


def channel_score_reduce_add_(a: Tensor, b: Optional[Tensor], c: Optional[Tensor], d: Tensor,
                              channel_dim: int, second_acc: Tensor, first_acc: Tensor) -> None:
    """In place: ``second_acc += Σ a⊙(b−d) + c⊙d``, ``first_acc += Σ a⊙d`` per channel.

    ``second_acc`` / ``first_acc``: ``(C,)``, float32 or float64 (both the same), on the inputs'
    device — running buffers for a layer called several times in one forward.
    """
    _ext.require("channel_score_reduce_add_")
    torch.ops.oba_ext.channel_score_reduce_add_.default(a, b, c, d, channel_dim, second_acc, first_acc)


def channel_first_order_reduce(a: Tensor, d: Tensor, channel_dim: int) -> Tensor:
    """``first[k] = Σ a⊙d`` over every dim but ``channel_dim`` (SPEC §5 first-order sums).

    Args: a, d: same shape/dtype/device. Returns ``(C,)`` (float64 for float64 inputs, else
    float32). Raises RuntimeError like :func:`channel_score_reduce`.
    """
    _ext.require("channel_first_order_reduce")
    return torch.ops.oba_ext.channel_first_order_reduce.default(a, d, channel_dim)


def _out_dtype(a: Tensor) -> torch.dtype:
    return torch.float64 if a.dtype == torch.float64 else torch.float32


def _check_fake(fn: str, a: Tensor, others, channel_dim: int) -> int:
    torch._check(a.dim() >= 1, lambda: f"{fn}: argument 'a' must be at least 1-D")
    torch._check(-a.dim() <= channel_dim < a.dim(),
                 lambda: f"{fn}: argument 'channel_dim' = {channel_dim} is out "
                         f"of range for a tensor with {a.dim()} dimensions")
    for name, t in others:
        if t is not None:
            torch._check(t.shape == a.shape, lambda: f"{fn}: argument '{name}' "
                         f"must have the shape of 'a' {tuple(a.shape)}, got {tuple(t.shape)}")
            torch._check(t.dtype == a.dtype, lambda: f"{fn}: argument '{name}' "
                         f"must have the dtype of 'a' ({a.dtype}), got {t.dtype}")
    return a.shape[channel_dim]


def _register_fakes() -> None:
    @torch.library.register_fake("oba_ext::channel_score_reduce")
    def _channel_score_reduce_fake(a, b, c, d, channel_dim):
        n = _check_fake("channel_score_reduce", a, (("b", b), ("c", c), ("d", d)), channel_dim)
        dtype = _out_dtype(a)
        return a.new_empty((n,), dtype=dtype), a.new_empty((n,), dtype=dtype)

    @torch.library.register_fake("oba_ext::channel_score_reduce_add_")
    def _channel_score_reduce_add_fake(a, b, c, d, channel_dim, second_acc, first_acc):
        _check_fake("channel_score_reduce_add_", a, (("b", b), ("c", c), ("d", d)), channel_dim)
        return None

    @torch.library.register_fake("oba_ext::channel_first_order_reduce")
    def _channel_first_order_reduce_fake(a, d, channel_dim):
        n = _check_fake("channel_first_order_reduce", a, (("d", d),), channel_dim)
        return a.new_empty((n,), dtype=_out_dtype(a))


if _ext.load():
    _register_fakes()
