"""The attention twins (``oba_ext.reference.attention``) against autograd in float64.

Oracles, independent of the twins' hand-written formulas:
- forward: ``torch.func.jvp`` of plain softmax attention;
- ``exact`` second stream: jvp of the vjp (the R-op of the gradient, Pearlmutter);
- ``oba`` second stream: the same jvp-of-vjp with the softmax's VJP frozen at the forward
  value (``vjp(softmax, S.detach())``): product-rule terms kept, softmax curvature dropped.
"""
import math

import pytest
import torch
from torch.func import jvp, vjp

from oba_ext.reference import attention as ref

from tolerances import SURVIVES, rel_err, F64_SAME_FORMULA as TOL64  # same formula, other order (measured ~1e-16)


def rel(a, b):
    """Relative Frobenius error (absolute where the reference is exactly zero)."""
    return rel_err(a, b)


def make(B, H, Nq, Nk, D, Dv=None, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    q, k, v = r(B, H, Nq, D), r(B, H, Nk, D), r(B, H, Nk, Dv)
    qd, kd, vd = r(B, H, Nq, D), r(B, H, Nk, D), r(B, H, Nk, Dv)
    go, co = r(B, H, Nq, Dv), r(B, H, Nq, Dv)
    return q, k, v, qd, kd, vd, go, co


def make_mask(kind, B, H, Nq, Nk, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind is None:
        return None
    if kind == "bool":  # broadcast over heads; keep the diagonal so no row is empty
        m = torch.rand(B, 1, Nq, Nk, generator=g) > 0.4
        m[..., 0] = True
        return m
    return torch.randn(1, H, Nq, Nk, generator=g, dtype=torch.float64)  # additive


def plain(q, k, v, mask, causal, s):
    S = s * q @ k.transpose(-1, -2)
    if mask is not None:
        S = S.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else S + mask
    if causal:
        keep = torch.ones(S.shape[-2:], dtype=torch.bool).tril()
        S = S.masked_fill(~keep, float("-inf"))
    return S


def oracle(q, k, v, qd, kd, vd, go, co, mask, causal, exact):
    s = 1.0 / math.sqrt(q.shape[-1])

    def grads(q, k, v, go):
        if exact:
            _, f = vjp(lambda q, k, v: torch.softmax(plain(q, k, v, mask, causal, s), -1) @ v,
                       q, k, v)
            return f(go)
        S = plain(q, k, v, mask, causal, s)
        A = torch.softmax(S, -1)
        G_V = A.transpose(-1, -2) @ go
        G_A = go @ v.transpose(-1, -2)
        _, fs = vjp(lambda S: torch.softmax(S, -1), S.detach())  # frozen softmax Jacobian
        G_S = fs(G_A)[0]
        return s * G_S @ k, s * G_S.transpose(-1, -2) @ q, G_V

    G, C = jvp(grads, (q, k, v, go), (qd, kd, vd, co))
    O, Od = jvp(lambda q, k, v: torch.softmax(plain(q, k, v, mask, causal, s), -1) @ v,
                (q, k, v), (qd, kd, vd))
    lse = torch.logsumexp(plain(q, k, v, mask, causal, s), -1)
    return O, Od, lse, G, C


CASES = [  # B, H, Nq, Nk, D, Dv, mask, causal
    (2, 3, 7, 7, 8, 8, None, False),
    (1, 2, 5, 9, 4, 6, None, False),
    (2, 2, 6, 6, 8, 8, "bool", False),
    (1, 3, 6, 8, 8, 8, "add", False),
    (2, 2, 7, 7, 8, 8, None, True),
    (1, 2, 9, 5, 4, 4, "add", True),
    (1, 1, 1, 1, 4, 4, None, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("exact", [False, True], ids=["oba", "exact"])
def test_twin_matches_autograd(case, exact):
    B, H, Nq, Nk, D, Dv, mk, causal = case
    q, k, v, qd, kd, vd, go, co = make(B, H, Nq, Nk, D, Dv)
    mask = make_mask(mk, B, H, Nq, Nk)
    O, Od, lse, G, C = oracle(q, k, v, qd, kd, vd, go, co, mask, causal, exact)
    o, od, l = ref.attention_two_stream_forward(q, k, v, qd, kd, vd, mask, causal, None)
    for name, a, b in (("O", o, O), ("O_dot", od, Od), ("lse", l, lse)):
        assert rel(a, b) < TOL64, (name, rel(a, b))
    out = ref.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, mask, causal, None,
                                              l, exact)
    for name, a, b in zip(("G_Q", "G_K", "G_V", "C_Q", "C_K", "C_V"), out, (*G, *C)):
        assert rel(a, b) < TOL64, (name, rel(a, b), (a - b).abs().max().item())


def test_oba_and_exact_differ():
    """The oracle pair is not vacuous: the softmax curvature changes C_Q and C_K."""
    q, k, v, qd, kd, vd, go, co = make(1, 2, 6, 6, 4)
    a = ref.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, exact=False)
    b = ref.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, exact=True)
    assert rel(a[3], b[3]) > SURVIVES and rel(a[4], b[4]) > SURVIVES
    assert rel(a[5], b[5]) < TOL64  # C_V has no softmax curvature


def test_none_tangents_are_zero():
    q, k, v, qd, kd, vd, go, co = make(1, 2, 5, 5, 4)
    z = torch.zeros_like
    a = ref.attention_second_order_backward(q, k, v, None, None, None, go, None, exact=True)
    b = ref.attention_second_order_backward(q, k, v, z(q), z(k), z(v), go, z(go), exact=True)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    f1 = ref.attention_two_stream_forward(q, k, v, None, None, None)
    assert torch.equal(f1[1], torch.zeros_like(f1[1]))


def test_fully_masked_row_is_zero():
    q, k, v, qd, kd, vd, go, co = make(1, 1, 3, 4, 4)
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[1] = False
    o, od, l = ref.attention_two_stream_forward(q, k, v, qd, kd, vd, mask)
    assert torch.isneginf(l[0, 0, 1]) and torch.all(o[0, 0, 1] == 0) and torch.all(od[0, 0, 1] == 0)
    out = ref.attention_second_order_backward(q, k, v, qd, kd, vd, go, co, mask, exact=True)
    assert all(torch.isfinite(t).all() for t in out)
    assert torch.all(out[0][0, 0, 1] == 0) and torch.all(out[3][0, 0, 1] == 0)
