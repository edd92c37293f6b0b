"""Attention written as explicit bilinear products and a softmax, for the oracles.

The fused kernels behind ``F.scaled_dot_product_attention`` and
``F.multi_head_attention_forward`` hide the two products ``Q Kᵀ`` and ``A V`` from a
``TorchFunctionMode``, and may lack double-backward support. The oracles replace them with the
plain math of SPEC §4 (``S = s·QKᵀ + mask``, ``A = softmax(S)``, ``O = AV``), evaluated with
``torch.matmul`` so that each product is seen by the recorder.
"""
from __future__ import annotations

import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def sdpa_math(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False) -> Tensor:
    """``F.scaled_dot_product_attention`` as ``softmax(s·QKᵀ + mask) V`` (dropout must be 0).

    query: (..., L, E), key: (..., S, E), value: (..., S, Ev); a boolean ``attn_mask`` marks the
    positions that take part (True), a float mask is added to the logits.
    """
    if dropout_p:
        raise NotImplementedError("oba_ext reference: attention dropout must be off "
                                  f"(dropout_p={dropout_p}); score in eval mode")
    if enable_gqa:
        rep = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(rep, dim=-3)
        value = value.repeat_interleave(rep, dim=-3)
    L, S = query.size(-2), key.size(-2)
    s = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    logits = torch.matmul(query, key.transpose(-2, -1)) * s
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        logits = logits.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    return torch.matmul(torch.softmax(logits, dim=-1), value)


_MHA_SIG = inspect.signature(F.multi_head_attention_forward)


def mha_math(*args, **kwargs):
    """``F.multi_head_attention_forward`` (sequence-first, as nn.MultiheadAttention calls it),
    written with F.linear and :func:`sdpa_math`-style products. Supports packed and separate
    q/k/v projection weights, attn_mask, key_padding_mask, need_weights and is_causal;
    bias_k/bias_v, add_zero_attn, static_k/static_v and dropout are refused."""
    a = _MHA_SIG.bind(*args, **kwargs)
    a.apply_defaults()
    p = a.arguments
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if p[name] is not None:
            raise NotImplementedError(f"oba_ext reference: nn.MultiheadAttention with {name} "
                                      "is not supported")
    if p["add_zero_attn"]:
        raise NotImplementedError("oba_ext reference: add_zero_attn is not supported")
    if p["training"] and p["dropout_p"]:
        raise NotImplementedError("oba_ext reference: attention dropout must be off; score in "
                                  "eval mode")
    query, key, value = p["query"], p["key"], p["value"]
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    L, N, E = query.shape
    S = key.shape[0]
    H = p["num_heads"]
    hd = E // H
    b = p["in_proj_bias"]
    bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
    if p["use_separate_proj_weight"]:
        wq, wk, wv = p["q_proj_weight"], p["k_proj_weight"], p["v_proj_weight"]
    else:
        wq, wk, wv = p["in_proj_weight"].chunk(3)
    q = F.linear(query, wq, bq)
    k = F.linear(key, wk, bk)
    v = F.linear(value, wv, bv)
    # (L, N, E) -> (N, H, L, hd)
    q = q.reshape(L, N, H, hd).permute(1, 2, 0, 3)
    k = k.reshape(S, N, H, hd).permute(1, 2, 0, 3)
    v = v.reshape(S, N, H, hd).permute(1, 2, 0, 3)

    logits = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
    attn_mask, kpm = p["attn_mask"], p["key_padding_mask"]
    if p["is_causal"] and attn_mask is None:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).triu(1)  # True = masked
    if attn_mask is not None:
        if attn_mask.dim() == 3:  # (N*H, L, S)
            attn_mask = attn_mask.reshape(N, H, L, S)
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(attn_mask, float("-inf"))
        else:
            logits = logits + attn_mask
    if kpm is not None:
        if not batched:
            kpm = kpm.unsqueeze(0)
        kpm = kpm.reshape(N, 1, 1, S)
        if kpm.dtype == torch.bool:
            logits = logits.masked_fill(kpm, float("-inf"))
        else:
            logits = logits + kpm
    attn = torch.softmax(logits, dim=-1)
    out = torch.matmul(attn, v)                                   # (N, H, L, hd)
    out = out.permute(2, 0, 1, 3).reshape(L, N, E)
    out = F.linear(out, p["out_proj_weight"], p["out_proj_bias"])
    weights = None
    if p["need_weights"]:
        weights = attn.mean(dim=1) if p["average_attn_weights"] else attn
        if not batched:
            weights = weights.squeeze(0)
    if not batched:
        out = out.squeeze(1)
    return out, weights


#: functions whose body the oracles replace by explicit products (re-entering the recorder)
DECOMPOSITIONS = {
    F.scaled_dot_product_attention: sdpa_math,
    F.multi_head_attention_forward: mha_math,
}
