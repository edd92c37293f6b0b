"""Typed wrappers over the compiled attention ops ``torch.ops.oba_ext.attention_*`` (SPEC §4),
with fake (meta) implementations for ``torch.compile`` / ``opcheck``.

Layout (the same in ``oba_ext.reference.attention``, the pure-PyTorch twins):
    q, q_dot: (B, H, N_q, D)    k, k_dot: (B, H_kv, N_k, D)    v, v_dot: (B, H_kv, N_k, D_v)
    H_kv = H, or a divisor of H (grouped-query attention: query head h uses key/value head
    h // (H / H_kv); k/v are not repeated, G_K/G_V/C_K/C_V sum over each group)
    G_O, C_O: (B, H, N_q, D_v)  lse: (B, H, N_q), float32 (float64 for float64 inputs)
    mask: bool (True = attend) or additive float, broadcastable to (B, H, N_q, N_k)
    is_causal: key j visible to query i iff j <= i (top-left aligned, as in SDPA)
    scale: s (None = 1/sqrt(D)). Tangents and ``C_O`` may be None (= zero).

Kernels (``csrc/common/attention_blocks.h``, one host routine for both devices): blocks of
(batch, key/value head) groups × query rows, at most 2^17 (CPU) / 2^24 (CUDA) score elements
each; per block the products (QKᵀ, Ṡ, G_O Vᵀ, C_A, then O, Ȯ and the gradients) are ATen
GEMMs (BLAS / cuBLAS). The row-wise softmax, its tangent and the product-rule terms are one
fused elementwise kernel on the GPU (``csrc/common/attention_rows.h``, one warp per row) and
the same mathematics as whole-block ATen ops on the CPU (vectorized by ATen's run-time ISA
dispatch). Extra memory: a few block-sized buffers, never N×N per head.
CPU: float32/float64. CUDA: float32/float64/float16/bfloat16 (row arithmetic and ``lse`` in
float32); compiled, not yet run on a GPU.

``torch.ops.oba_ext._attention_forward_config`` / ``_attention_backward_config`` (CPU only,
for tests) are the same ops with two extra arguments: ``block_elems`` (the block budget) and
``emulate_warp`` (run the row pass as the CUDA kernel's own row functions, in its 32-lane
decomposition, instead of the CPU's ATen ops).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _ext

_ext.load()  # registers torch.ops.oba_ext.* when built; failures are kept, not raised

__all__ = ["attention_two_stream_forward", "attention_second_order_backward", "available"]

_FWD = "oba_ext::attention_two_stream_forward"
_BWD = "oba_ext::attention_second_order_backward"
_FWD_CONFIG = "oba_ext::_attention_forward_config"
_BWD_CONFIG = "oba_ext::_attention_backward_config"


def available() -> bool:
    """Whether the compiled attention ops are registered."""
    return hasattr(torch.ops, "oba_ext") and hasattr(torch.ops.oba_ext,
                                                     "attention_second_order_backward")


def attention_two_stream_forward(q: Tensor, k: Tensor, v: Tensor, q_dot: Optional[Tensor],
                                 k_dot: Optional[Tensor], v_dot: Optional[Tensor],
                                 mask: Optional[Tensor] = None, is_causal: bool = False,
                                 scale: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(O, Ȯ, lse): O = softmax(s·QKᵀ + mask)V, Ȯ = ȦV + AV̇ with Ṡ = s(Q̇Kᵀ + QK̇ᵀ),
    Ȧ = A⊙(Ṡ − rowsum(A⊙Ṡ)); lse = logsumexp(S) per query row (−inf for a row with no
    visible key, whose O and Ȯ are 0)."""
    _ext.require("attention_two_stream_forward")
    return torch.ops.oba_ext.attention_two_stream_forward(q, k, v, q_dot, k_dot, v_dot, mask,
                                                          is_causal, scale)


def attention_second_order_backward(q: Tensor, k: Tensor, v: Tensor, q_dot: Optional[Tensor],
                                    k_dot: Optional[Tensor], v_dot: Optional[Tensor], G_O: Tensor,
                                    C_O: Optional[Tensor], mask: Optional[Tensor] = None,
                                    is_causal: bool = False, scale: Optional[float] = None,
                                    lse: Optional[Tensor] = None, exact: bool = False
                                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(G_Q, G_K, G_V, C_Q, C_K, C_V) of SPEC §4: the first stream (the ordinary VJP of G_O)
    and the second stream (C_O plus the product-rule injections of the tangents; with
    ``exact`` also the softmax curvature terms). ``lse`` is the forward's; None recomputes it
    with a forward pass."""
    _ext.require("attention_second_order_backward")
    if lse is None:
        lse = attention_two_stream_forward(q, k, v, None, None, None, mask, is_causal, scale)[2]
    return torch.ops.oba_ext.attention_second_order_backward(
        q, k, v, q_dot, k_dot, v_dot, G_O, C_O, mask, is_causal, scale, lse, exact)


def _lse_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _fwd_fake(q, k, v, q_dot, k_dot, v_dot, mask, is_causal, scale, *config):
    shape = (*q.shape[:-1], v.shape[-1])
    return (q.new_empty(shape), q.new_empty(shape),
            q.new_empty(q.shape[:-1], dtype=_lse_dtype(q)))


def _bwd_fake(q, k, v, q_dot, k_dot, v_dot, G_O, C_O, mask, is_causal, scale, lse, exact,
              *config):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format),
            torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


if available():
    torch.library.register_fake(_FWD)(_fwd_fake)
    torch.library.register_fake(_BWD)(_bwd_fake)
    if hasattr(torch.ops.oba_ext, "_attention_forward_config"):
        torch.library.register_fake(_FWD_CONFIG)(_fwd_fake)
        torch.library.register_fake(_BWD_CONFIG)(_bwd_fake)
