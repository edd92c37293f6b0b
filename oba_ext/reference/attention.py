"""Pure-PyTorch twins of the attention ops (SPEC §4): the plain O(N²) math, written
independently of the kernels in ``csrc/*/attention.*`` that they check.

Layout (same as the kernels):
    q: (B, H, N_q, D)   k: (B, H_kv, N_k, D)   v: (B, H_kv, N_k, D_v)
    (H_kv = H, or for grouped-query attention a divisor of H: query head h attends with
    key/value head h // (H / H_kv); the twin repeats k/v and sums their cotangents back)
    q_dot/k_dot/v_dot: tangents of the same shapes, or None (= zero)
    mask: None, bool (True = attend, like ``F.scaled_dot_product_attention``) or additive
          float, broadcastable to (B, H, N_q, N_k)
    is_causal: key j is visible to query i iff j <= i (top-left aligned, like SDPA)
    scale: s, default 1/sqrt(D)

Equations (S = s·Q Kᵀ + mask, A = softmax(S) over keys, O = A V):
    Ṡ = s(Q̇Kᵀ + QK̇ᵀ),  Ȧ = A⊙(Ṡ − rowsum(A⊙Ṡ)),  Ȯ = ȦV + AV̇
    G_V = AᵀG_O, G_A = G_O Vᵀ, G_S = A⊙(G_A − rowsum(A⊙G_A)), G_Q = s G_S K, G_K = s G_Sᵀ Q
    C_A = C_O Vᵀ + G_O V̇ᵀ, C_V = AᵀC_O + ȦᵀG_O, C_S = A⊙(C_A − rowsum(A⊙C_A))
        (+ exact: Ȧ⊙(G_A − rowsum(A⊙G_A)) − A⊙rowsum(Ȧ⊙G_A)),
    C_Q = s(C_S K + G_S K̇),  C_K = s(C_Sᵀ Q + G_Sᵀ Q̇)

A query row whose keys are all masked has A = 0 (so O = 0, lse = −inf and zero gradients);
SDPA would return NaN there. Computation runs in float32 for half/bfloat16 inputs (outputs are
cast back); ``lse`` is float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["attention_two_stream_forward", "attention_second_order_backward"]


def _acc(t: Tensor) -> Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def _rep(q, k):
    """Query heads per key/value head (grouped-query attention), checked."""
    H, Hkv = q.shape[1], k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"k has {Hkv} heads, which must divide q's {H} (grouped-query "
                         f"attention)")
    return H // Hkv


def _expand_heads(t, rep):
    return t if t is None or rep == 1 else t.repeat_interleave(rep, dim=1)


def _fold_heads(t, rep):
    """(B, H, N, X) cotangent of repeated k/v → (B, H_kv, N, X) (sum over each group)."""
    return t if rep == 1 else t.unflatten(1, (t.shape[1] // rep, rep)).sum(2)


def _scores(q, k, mask, is_causal, scale):
    """S = s·QKᵀ + mask (−inf where not attended), in the accumulation dtype."""
    s = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    S = s * torch.matmul(_acc(q), _acc(k).transpose(-1, -2))
    if mask is not None:
        if mask.dtype == torch.bool:
            S = S.masked_fill(~mask, float("-inf"))
        else:
            S = S + mask.to(S.dtype)
    if is_causal:
        nq, nk = S.shape[-2], S.shape[-1]
        keep = torch.ones(nq, nk, dtype=torch.bool, device=S.device).tril()
        S = S.masked_fill(~keep, float("-inf"))
    return S, s


def _softmax(S):
    """A = softmax(S) and lse = logsumexp(S) per row; rows with no visible key: A = 0."""
    lse = torch.logsumexp(S, dim=-1)
    dead = torch.isneginf(lse)
    A = torch.exp(S - torch.where(dead, torch.zeros_like(lse), lse).unsqueeze(-1))
    A = torch.where(dead.unsqueeze(-1), torch.zeros_like(A), A)
    return A, lse


def _zeros_or(t, like):
    return _acc(t) if t is not None else torch.zeros_like(_acc(like))


def _a_dot(A, q, k, q_dot, k_dot, s):
    """Ȧ = A⊙(Ṡ − rowsum(A⊙Ṡ)), Ṡ = s(Q̇Kᵀ + QK̇ᵀ)."""
    if q_dot is None and k_dot is None:
        return torch.zeros_like(A)
    S_dot = torch.zeros_like(A)
    if q_dot is not None:
        S_dot = S_dot + s * torch.matmul(_acc(q_dot), _acc(k).transpose(-1, -2))
    if k_dot is not None:
        S_dot = S_dot + s * torch.matmul(_acc(q), _acc(k_dot).transpose(-1, -2))
    return A * (S_dot - (A * S_dot).sum(-1, keepdim=True))


def attention_two_stream_forward(q: Tensor, k: Tensor, v: Tensor, q_dot: Optional[Tensor],
                                 k_dot: Optional[Tensor], v_dot: Optional[Tensor],
                                 mask: Optional[Tensor] = None, is_causal: bool = False,
                                 scale: Optional[float] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(O, Ȯ, lse): O = softmax(s·QKᵀ + mask)V, Ȯ = ȦV + AV̇; O, Ȯ: (B, H, N_q, D_v) in q's
    dtype, lse: (B, H, N_q) float32 (float64 for float64 inputs)."""
    rep = _rep(q, k)
    k, v, k_dot, v_dot = (_expand_heads(t, rep) for t in (k, v, k_dot, v_dot))
    S, s = _scores(q, k, mask, is_causal, scale)
    A, lse = _softmax(S)
    vv = _acc(v)
    O = torch.matmul(A, vv)
    A_dot = _a_dot(A, q, k, q_dot, k_dot, s)
    O_dot = torch.matmul(A_dot, vv)
    if v_dot is not None:
        O_dot = O_dot + torch.matmul(A, _acc(v_dot))
    return O.to(q.dtype), O_dot.to(q.dtype), lse


def attention_second_order_backward(q: Tensor, k: Tensor, v: Tensor, q_dot: Optional[Tensor],
                                    k_dot: Optional[Tensor], v_dot: Optional[Tensor], G_O: Tensor,
                                    C_O: Optional[Tensor], mask: Optional[Tensor] = None,
                                    is_causal: bool = False, scale: Optional[float] = None,
                                    lse: Optional[Tensor] = None, exact: bool = False
                                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(G_Q, G_K, G_V, C_Q, C_K, C_V) of SPEC §4 (both streams; ``exact`` adds the softmax
    curvature terms). ``lse`` is accepted for signature parity and ignored: the twin
    recomputes A from scratch. Outputs have the shapes and dtypes of q, k, v."""
    rep = _rep(q, k)
    k, v, k_dot, v_dot = (_expand_heads(t, rep) for t in (k, v, k_dot, v_dot))
    S, s = _scores(q, k, mask, is_causal, scale)
    A, _ = _softmax(S)
    vv, qq, kk, GO = _acc(v), _acc(q), _acc(k), _acc(G_O)
    CO = _zeros_or(C_O, G_O)
    A_dot = _a_dot(A, q, k, q_dot, k_dot, s)

    G_V = A.transpose(-1, -2) @ GO
    G_A = GO @ vv.transpose(-1, -2)
    G_Ac = G_A - (A * G_A).sum(-1, keepdim=True)
    G_S = A * G_Ac
    G_Q = s * (G_S @ kk)
    G_K = s * (G_S.transpose(-1, -2) @ qq)

    C_A = CO @ vv.transpose(-1, -2)
    if v_dot is not None:
        C_A = C_A + GO @ _acc(v_dot).transpose(-1, -2)
    C_V = A.transpose(-1, -2) @ CO + A_dot.transpose(-1, -2) @ GO
    C_S = A * (C_A - (A * C_A).sum(-1, keepdim=True))
    if exact:
        C_S = C_S + A_dot * G_Ac - A * (A_dot * G_A).sum(-1, keepdim=True)
    C_Q = C_S @ kk
    C_K = C_S.transpose(-1, -2) @ qq
    if k_dot is not None:
        C_Q = C_Q + G_S @ _acc(k_dot)
    if q_dot is not None:
        C_K = C_K + G_S.transpose(-1, -2) @ _acc(q_dot)
    C_Q, C_K = s * C_Q, s * C_K
    G_K, G_V, C_K, C_V = (_fold_heads(t, rep) for t in (G_K, G_V, C_K, C_V))
    return (G_Q.to(q.dtype), G_K.to(k.dtype), G_V.to(v.dtype),
            C_Q.to(q.dtype), C_K.to(k.dtype), C_V.to(v.dtype))
