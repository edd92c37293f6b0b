"""Typed wrappers of the per-weight score kernels (SPEC §5), ``torch.ops.oba_ext.*_weight_score``.

    score = w ⊙ Σ_k P(grads[k], inputs[k])

computed as ONE weight-gradient product over the batch-stacked streams (ATen's GEMM / conv
wgrad: BLAS/cuBLAS/cuDNN), then ``⊙w`` as a separate elementwise pass in place on the product
(not fused into the GEMM; no extra output buffer):

- :func:`linear_weight_score`: ``P = cat(grads)ᵀ cat(inputs)``; ``w: (C_out, C_in)``,
  ``grads[k]: (..., C_out)``, ``inputs[k]: (..., C_in)`` (same leading dims per pair).
- :func:`conv_weight_score`: ``P`` = the weight gradient of ``conv(input=cat(inputs),
  weight=w)`` at ``grad_output=cat(grads)`` (batch-stacked); ``w: (C_out, C_in/groups, k...)`` of
  a Conv1d/Conv2d, ``inputs[k]: (N_k, C_in, L...)``, ``grads[k]: (N_k, C_out, L_out...)``.

Second order (OBA / exact): ``grads=[G, C], inputs=[T, X]``; first order: ``grads=[G], inputs=[X]``.
Result: the shape of ``w``, contiguous, float64 for float64 weights, else float32.

Precision: float16/bfloat16 streams are converted to float32 before the product, so products,
the sum over rows and the sum over streams are all float32 (float64 for float64). TF32 on
Ampere/Hopper GPUs: float32 products follow PyTorch's switches —
``torch.backends.cuda.matmul.allow_tf32`` for :func:`linear_weight_score` (default ``False``:
full float32) and ``torch.backends.cudnn.allow_tf32`` for :func:`conv_weight_score` (default
``True``: inputs rounded to a 10-bit mantissa, about 1e-3 relative error per product for float32
inputs; float16/bfloat16 values are exact in TF32). Set ``torch.backends.cudnn.allow_tf32 =
False`` for float32-exact convolution scores. The twins follow the same switches.

Errors (RuntimeError, argument named): the compiled extension is not loaded; empty or unequal
``grads``/``inputs`` lists; a stream of another dtype/device than ``w``; shapes that do not fit
``w`` (or the convolution geometry). Pure-PyTorch twins: :mod:`oba_ext.reference.weight`.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import Tensor

from .. import _ext

__all__ = ["linear_weight_score", "conv_weight_score"]


def linear_weight_score(w: Tensor, grads: List[Tensor], inputs: List[Tensor]) -> Tensor:
    """``w ⊙ Σ_k grads[k]ᵀ inputs[k]`` (leading dims flattened): ``(C_out, C_in)``."""
    _ext.require("linear_weight_score")
    return torch.ops.oba_ext.linear_weight_score.default(w, list(grads), list(inputs))


def conv_weight_score(w: Tensor, grads: List[Tensor], inputs: List[Tensor], stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """``w ⊙ wgrad(cat(grads), cat(inputs))`` for a Conv1d/Conv2d weight: the shape of ``w``.

    ``stride``/``padding``/``dilation``: 1 or ``w.dim() - 2`` ints (numeric padding only: pad
    explicitly for 'same'/'reflect'/'circular' modules).
    """
    _ext.require("conv_weight_score")
    return torch.ops.oba_ext.conv_weight_score.default(
        w, list(grads), list(inputs), list(stride), list(padding), list(dilation), int(groups))


def _register_fakes() -> None:
    def out_like(w):
        dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        return w.new_empty(w.shape, dtype=dtype)

    @torch.library.register_fake("oba_ext::linear_weight_score")
    def _linear_weight_score_fake(w, grads, inputs):
        torch._check(w.dim() == 2, lambda: f"linear_weight_score: argument 'w' must be 2-D, got {w.dim()}-D")
        torch._check(len(grads) == len(inputs) and len(grads) > 0,
                     lambda: "linear_weight_score: 'grads' and 'inputs' must be non-empty lists of equal length")
        return out_like(w)

    @torch.library.register_fake("oba_ext::conv_weight_score")
    def _conv_weight_score_fake(w, grads, inputs, stride, padding, dilation, groups):
        torch._check(w.dim() in (3, 4), lambda: f"conv_weight_score: argument 'w' must be 3-D or 4-D, got {w.dim()}-D")
        torch._check(len(grads) == len(inputs) and len(grads) > 0,
                     lambda: "conv_weight_score: 'grads' and 'inputs' must be non-empty lists of equal length")
        return out_like(w)


if _ext.load():
    _register_fakes()
