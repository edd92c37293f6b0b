"""Pure-PyTorch twins of :mod:`oba_ext.ops.weight` (same names, same signatures).

Written independently of the kernels (csrc/*/weight.*): one product per stream (no batch
stacking), summed over streams; then ``w ⊙ P``. Everything runs in the output dtype (float64 for
float64 weights, else float32): float16/bfloat16 streams are converted to float32 before the
products, as the kernels do. On CUDA, float32 products follow the same TF32 switches as the
kernels (``torch.backends.cuda.matmul.allow_tf32`` for the einsum,
``torch.backends.cudnn.allow_tf32`` for the convolution).

- ``linear_weight_score``: ``P = Σ_k einsum('mo,mi->oi', grads[k], inputs[k])``.
- ``conv_weight_score``: ``P = Σ_k`` the autograd weight gradient of ``F.conv{1,2}d`` at
  ``grads[k]``.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["linear_weight_score", "conv_weight_score"]


def _out_dtype(w: Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _check_pairs(fn: str, grads, inputs) -> None:
    if len(grads) == 0 or len(grads) != len(inputs):
        raise ValueError(f"{fn}: 'grads' and 'inputs' must be non-empty lists of equal length, "
                         f"got {len(grads)} and {len(inputs)}")


def linear_weight_score(w: Tensor, grads: List[Tensor], inputs: List[Tensor]) -> Tensor:
    """``w ⊙ Σ_k grads[k]ᵀ inputs[k]``; w: (C_out, C_in), grads[k]: (..., C_out),
    inputs[k]: (..., C_in). Returns (C_out, C_in), float64 for float64 w, else float32."""
    _check_pairs("linear_weight_score", grads, inputs)
    if w.dim() != 2:
        raise ValueError(f"linear_weight_score: argument 'w' must be 2-D, got shape {tuple(w.shape)}")
    acc = _out_dtype(w)
    prod = None
    for g, x in zip(grads, inputs):
        p = torch.einsum("mo,mi->oi", g.reshape(-1, w.shape[0]).to(acc),
                         x.reshape(-1, w.shape[1]).to(acc))
        prod = p if prod is None else prod + p
    return w.to(acc) * prod


_CONV = {3: F.conv1d, 4: F.conv2d}


def conv_weight_score(w: Tensor, grads: List[Tensor], inputs: List[Tensor], stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """``w ⊙ Σ_k ∂⟨grads[k], conv(inputs[k], w)⟩/∂w`` for a Conv1d/Conv2d weight
    ``w: (C_out, C_in/groups, k...)``; returns the shape of w (float64 for float64 w, else
    float32)."""
    _check_pairs("conv_weight_score", grads, inputs)
    if w.dim() not in _CONV:
        raise ValueError(f"conv_weight_score: argument 'w' must be 3-D or 4-D, got shape {tuple(w.shape)}")
    conv = _CONV[w.dim()]
    acc = _out_dtype(w)
    prod = None
    with torch.enable_grad():
        for g, x in zip(grads, inputs):
            wv = w.detach().to(acc).requires_grad_(True)
            y = conv(x.detach().to(acc), wv, None, list(stride), list(padding), list(dilation), groups)
            (p,) = torch.autograd.grad(y, wv, grad_outputs=g.detach().to(acc))
            prod = p if prod is None else prod + p
    return w.to(acc) * prod
