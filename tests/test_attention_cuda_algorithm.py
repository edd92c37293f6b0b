"""The recurrences of the CUDA attention kernels (csrc/cuda/attention.cu), replayed in float64.

No GPU here: the kernels themselves run only in the ``@pytest.mark.cuda`` tests of
tests/test_attention_ops.py. This file checks, on the CPU, the *algorithm* the kernels
implement, step for step in the same order (one key j at a time, all query rows at once in
place of one warp per row), against the twins of oba_ext/reference/attention.py:

- attn_fwd: online softmax with weighted Welford moments (running max m, W = Σp, mx = Σpṡ/W,
  mv = Σpv/W, co-moment cv = Σp(Ṡ − mx)(v − mv), ovd = Σpv̇; rescaled by e^{m_old − m_new});
- attn_bwd_q pass 1: weighted Welford means δ_G, δ_C, r and co-moment ε = Σ A(Ṡ − r)(G_A − δ_G);
  pass 2: G_Q, C_Q (running sums over keys); attn_bwd_kv: G_K, C_K, G_V, C_V (running sums
  over query rows) from the stored row stats.
A change to the kernels' recurrences must be mirrored here (and vice versa).
"""
import math

import pytest
import torch

from oba_ext.reference import attention as ref
from tolerances import F64_SAME_FORMULA, rel_err

NEG_INF = float("-inf")


def _scores_col(q, k, mask, causal, s, j):
    """S[:, :, :, j] as the kernels form it: s·q·k_j + mask (−inf outside causal)."""
    S = s * (q * k[:, :, j:j + 1, :]).sum(-1)
    if mask is not None:
        S = S + mask[..., j]
    if causal:
        i = torch.arange(q.shape[2])
        S = torch.where(i >= j, S, torch.full_like(S, NEG_INF))
    return S


def emulate_forward(q, k, v, qd, kd, vd, mask, causal):
    s = 1.0 / math.sqrt(q.shape[-1])
    B, H, Nq, _ = q.shape
    m = torch.full((B, H, Nq), NEG_INF, dtype=q.dtype)
    W = torch.zeros(B, H, Nq, dtype=q.dtype)
    mx = torch.zeros_like(W)
    mv = torch.zeros(B, H, Nq, v.shape[-1], dtype=q.dtype)
    cv, ovd = torch.zeros_like(mv), torch.zeros_like(mv)
    for j in range(k.shape[2]):
        S = _scores_col(q, k, mask, causal, s, j)
        Sd = s * ((qd * k[:, :, j:j + 1]).sum(-1) + (q * kd[:, :, j:j + 1]).sum(-1))
        live = S != NEG_INF  # the kernels `continue` on masked keys
        m_new = torch.where(live, torch.maximum(m, S), m)
        corr = torch.where(live, torch.exp(m - m_new), torch.ones_like(m))
        e = torch.where(live, torch.exp(S - m_new), torch.zeros_like(m))
        W = W * corr + e
        f = torch.where(live, e / torch.where(W > 0, W, torch.ones_like(W)), torch.zeros_like(W))
        dx = Sd - mx
        mx = mx + dx * f
        vv, vdv = v[:, :, j:j + 1, :], vd[:, :, j:j + 1, :]
        mv = mv + (vv - mv) * f[..., None]
        cv = cv * corr[..., None] + (e * dx)[..., None] * (vv - mv)
        ovd = ovd * corr[..., None] + e[..., None] * vdv
        m = m_new
    dead = W == 0
    Wsafe = torch.where(dead, torch.ones_like(W), W)
    O = torch.where(dead[..., None], torch.zeros_like(mv), mv)
    Od = torch.where(dead[..., None], torch.zeros_like(mv), (cv + ovd) / Wsafe[..., None])
    lse = torch.where(dead, torch.full_like(m, NEG_INF), m + torch.log(Wsafe))
    return O, Od, lse


def _running_sum(terms):
    total = None
    for x in terms:
        total = x if total is None else total + x
    return total


def emulate_backward(q, k, v, qd, kd, vd, go, co, mask, causal, lse, exact):
    s = 1.0 / math.sqrt(q.shape[-1])
    Nq, Nk = q.shape[2], k.shape[2]

    def pair(j):
        S = _scores_col(q, k, mask, causal, s, j)
        A = torch.where(lse == NEG_INF, torch.zeros_like(S), torch.exp(S - lse))
        Sd = s * ((qd * k[:, :, j:j + 1]).sum(-1) + (q * kd[:, :, j:j + 1]).sum(-1))
        ga = (go * v[:, :, j:j + 1]).sum(-1)
        ca = (co * v[:, :, j:j + 1]).sum(-1) + (go * vd[:, :, j:j + 1]).sum(-1)
        return A, Sd, ga, ca

    z = torch.zeros_like(lse)
    W, r, dG, dC, eps = z.clone(), z.clone(), z.clone(), z.clone(), z.clone()
    cols = []
    for j in range(Nk):  # attn_bwd_q pass 1: weighted Welford means and co-moment
        A, Sd, ga, ca = pair(j)
        cols.append((A, Sd, ga, ca))
        W = W + A
        f = torch.where(A != 0, A / torch.where(W > 0, W, torch.ones_like(W)), z)
        dx = Sd - r
        r = r + dx * f
        dG = dG + (ga - dG) * f
        dC = dC + (ca - dC) * f
        eps = eps + A * dx * (ga - dG)

    def streams(A, Sd, ga, ca):
        Ad = A * (Sd - r)
        GS = A * (ga - dG)
        CS = A * (ca - dC)
        if exact:
            CS = CS + Ad * (ga - dG) - A * eps
        return Ad, GS, CS

    terms = [streams(*c) for c in cols]  # each (B, H, N_q)
    # attn_bwd_q pass 2: over keys j, per query row
    GQ = _running_sum(t[1][..., None] * k[:, :, j:j + 1] for j, t in enumerate(terms))
    CQ = _running_sum(t[2][..., None] * k[:, :, j:j + 1] + t[1][..., None] * kd[:, :, j:j + 1]
                      for j, t in enumerate(terms))
    # attn_bwd_kv: over query rows i, per key j
    Ad, GS, CS = (torch.stack([t[n] for t in terms], -1) for n in range(3))  # (B, H, Nq, Nk)
    A = torch.stack([c[0] for c in cols], -1)

    def over_rows(f):
        return _running_sum(f(i) for i in range(Nq))
    GK = over_rows(lambda i: GS[:, :, i, :, None] * q[:, :, i:i + 1])
    CK = over_rows(lambda i: CS[:, :, i, :, None] * q[:, :, i:i + 1]
                   + GS[:, :, i, :, None] * qd[:, :, i:i + 1])
    GV = over_rows(lambda i: A[:, :, i, :, None] * go[:, :, i:i + 1])
    CV = over_rows(lambda i: A[:, :, i, :, None] * co[:, :, i:i + 1]
                   + Ad[:, :, i, :, None] * go[:, :, i:i + 1])
    return s * GQ, s * GK, GV, s * CQ, s * CK, CV


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "add"])
@pytest.mark.parametrize("exact", [False, True])
def test_cuda_recurrences_match_twin(mask_kind, causal, exact):
    g = torch.Generator().manual_seed(0)
    B, H, Nq, Nk, D, Dv = 2, 2, 9, 11, 8, 6
    r = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, H, Nq, D), 3 * r(B, H, Nk, D), r(B, H, Nk, Dv)  # peaked softmax rows
    qd, kd, vd = r(B, H, Nq, D), r(B, H, Nk, D), r(B, H, Nk, Dv)
    go, co = r(B, H, Nq, Dv), r(B, H, Nq, Dv)
    mask = None
    if mask_kind == "bool":
        keep = torch.rand(B, 1, Nq, Nk, generator=g) > 0.4
        keep[:, :, 0] = True
        keep[:, :, 3] = False  # one query row with no visible key
        mask = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, NEG_INF)
    elif mask_kind == "add":
        mask = r(1, H, Nq, Nk)
    want = ref.attention_two_stream_forward(q, k, v, qd, kd, vd, mask, causal, None)
    got = emulate_forward(q, k, v, qd, kd, vd, mask, causal)
    for name, a, b in zip(("O", "O_dot", "lse"), got, want):
        fin = torch.isfinite(b)
        assert torch.equal(fin, torch.isfinite(a)), name
        assert rel_err(a[fin], b[fin]) <= F64_SAME_FORMULA, name
    wb = ref.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, mask, causal, None,
                                             want[2], exact)
    gb = emulate_backward(q, k, v, qd, kd, vd, go, co, mask, causal, want[2], exact)
    for name, a, b in zip(("G_Q", "G_K", "G_V", "C_Q", "C_K", "C_V"), gb, wb):
        err = rel_err(a, b)
        assert err <= F64_SAME_FORMULA, (name, err)


def test_cuda_recurrences_float32_rule():
    """In float32 the recurrences obey the kernel tolerance rule of tests/tolerances.py
    (≤ 2× the float32 twin's error against float64, up to the rule's sampling allowance): the Welford co-moments avoid the cancellation of
    Σ AṠv − r Σ Av and Σ AṠG_A − r δ_G. Sizes where that cancellation matters: a peaked
    softmax (k scaled by 4) and Ṡ with a large mean (q̇ = 3q + noise)."""
    from tolerances import assert_matches
    g = torch.Generator().manual_seed(1)
    B, H, Nq, Nk, D = 1, 2, 64, 64, 16
    r = lambda *sh: torch.randn(*sh, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, H, Nq, D), 4 * r(B, H, Nk, D), r(B, H, Nk, D) + 5
    qd, kd, vd = 3 * q + r(B, H, Nq, D), r(B, H, Nk, D), r(B, H, Nk, D)
    go, co = r(B, H, Nq, D), r(B, H, Nq, D)
    args32 = tuple(t.float() for t in (q, k, v, qd, kd, vd))
    args64 = tuple(t.double() for t in args32)  # the float64 reference sees the same inputs
    go, co = go.float().double(), co.float().double()
    f64 = ref.attention_two_stream_forward(*args64, None, True, None)
    f32 = ref.attention_two_stream_forward(*args32, None, True, None)
    e32 = emulate_forward(*args32, None, True)
    for name, a, b, t in zip(("O", "O_dot", "lse"), e32, f64, f32):
        assert_matches(a, b, t, dtype=torch.float32, what=f"emulated {name}")
    b64 = ref.attention_second_order_backward(*args64, go, co, None, True, None, f64[2], True)
    b32 = ref.attention_second_order_backward(*args32, go.float(), co.float(), None, True, None,
                                              f32[2], True)
    e32 = emulate_backward(*args32, go.float(), co.float(), None, True, f32[2], True)
    for name, a, b, t in zip(("G_Q", "G_K", "G_V", "C_Q", "C_K", "C_V"), e32, b64, b32):
        assert_matches(a, b, t, dtype=torch.float32, what=f"emulated {name}")
