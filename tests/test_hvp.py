"""Curvature products along any direction (oba_ext.hvp, CurvatureOperator, score(direction=),
the hessian_trace criterion) against brute force on tiny float64 models: full Hessians by
torch.func.hessian, OBA's Ĥ as the Hessian of the linearized twin minus its Gauss-Newton
matrix (as tests/test_oracles.py), and the GGN as J_zᵀ H_loss J_z from full Jacobians."""
from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import brute
import oba_ext
import tiny_models as tm
from oba_ext.reference.structured import weight_in
from tolerances import (DEGENERATE, EIGSH_TOL, FLOAT64_RTOL, PSD_ROUNDING, ZERO_IN_PRODUCT,
                        assert_close_rel, assert_matches)

#: batches per data set: two for the MLP (products are averaged over batches), one elsewhere
#: (the brute-force matrices dominate this file's time)
BATCHES = {"gelu_mlp": 2}


def _bufs(m):
    return {n: b for n, b in m.named_buffers()}


class Gated(nn.Module):
    """Products of two activations (a gated MLP), max/avg pooling and a bias-free layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.a, self.b = nn.Linear(4, 5), nn.Linear(4, 5, bias=False)
        self.out = nn.Linear(5, 3)

    def forward(self, x):
        h = F.avg_pool2d(torch.tanh(self.conv(x)), 2)
        h = F.adaptive_max_pool2d(h, 1).flatten(1)
        return self.out(self.a(h) * torch.sigmoid(self.b(h)))


def gated_fn(p, x, nl):
    h = nl(torch.tanh, F.conv2d(x, p["conv.weight"], p["conv.bias"], padding=1))
    h = nl(lambda t: F.avg_pool2d(t, 2), h)
    h = nl(lambda t: F.adaptive_max_pool2d(t, 1).flatten(1), h)
    g = nl(torch.sigmoid, F.linear(h, p["b.weight"]))
    return F.linear(F.linear(h, p["a.weight"], p["a.bias"]) * g, p["out.weight"], p["out.bias"])


def _cases():
    torch.manual_seed(0)
    cnn = tm.CNN().double()
    for m in cnn.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.5, 0.5)
    res = tm.ResCNN().double()
    res.bn.running_mean.uniform_(-0.5, 0.5); res.bn.running_var.uniform_(0.5, 2.0)
    att = tm.AttnBlock().double()
    att.norm.weight.data.uniform_(0.5, 1.5); att.norm.bias.data.uniform_(-0.3, 0.3)
    mlp, gated = tm.MLP().double(), Gated().double()
    cnn_train = copy.deepcopy(cnn).train()
    return {  # model, input shape, functional twin (p, x, nl)
        "gelu_mlp": (mlp.eval(), (4, 5), tm.mlp_fn),
        "cnn_bn_eval": (cnn.eval(), (3, 2, 6, 6),
                        lambda p, x, nl: tm.cnn_fn(p, x, nl, _bufs(cnn), False)),
        "cnn_bn_train": (cnn_train, (3, 2, 6, 6),
                         lambda p, x, nl: tm.cnn_fn(p, x, nl, _bufs(cnn_train), True)),
        "residual_grouped_cnn": (res.eval(), (3, 2, 6, 6),
                                 lambda p, x, nl: tm.rescnn_fn(p, x, nl, _bufs(res))),
        "attention_qkv": (att.eval(), (2, 5, 8), tm.attn_fn),
        "gated_pooling": (gated.eval(), (3, 2, 6, 6), gated_fn),
    }


CASES = _cases()


def _case_data(case):
    return _data(CASES[case][1], n=BATCHES.get(case, 1))


def _data(shape, seed=1, n=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (shape[0],), generator=g)) for _ in range(n)]


_BRUTE = {}


def brute_matrix(case, kind):
    """The full ``kind`` matrix over the target parameters (flattened in module order),
    averaged over the case's batches (``H``; ``Ĥ`` = Hessian of the linearized twin minus its
    Gauss-Newton matrix; ``GGN = Jᵀ H_loss J``), with the flattening helpers; cached."""
    key = (case, kind)
    if key in _BRUTE:
        return _BRUTE[key]
    model, shape, fn = CASES[case]
    tp = brute.target_params(model)
    others = {n: p.detach() for n, p in model.named_parameters() if n not in tp}
    allp = {n: p.detach() for n, p in model.named_parameters()}
    bufs = _bufs(model)
    names, v0, unflat = brute.flat(tp)
    P = v0.numel()
    M = torch.zeros(P, P, dtype=torch.float64)
    data = _case_data(case)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention has no forward-mode AD
        for x, y in data:
            def f(v):
                return functional_call(model, {**others, **{n: b.clone() for n, b in bufs.items()},
                                               **unflat(v)}, (x,))
            if kind == "exact":
                M += hessian(lambda v: F.cross_entropy(f(v), y))(v0)
                continue
            if kind == "oba":
                lin = tm.Linearizer()
                fn(allp, x, lin)
                lin.start_linearized()

                def f(v):  # noqa: F811 — the linearized twin
                    lin.i = 0
                    return fn({**allp, **unflat(v)}, x, lin)
                M += hessian(lambda v: F.cross_entropy(f(v), y))(v0)
            z0 = f(v0).detach()
            Hl = hessian(lambda z: F.cross_entropy(z, y))(z0).reshape(z0.numel(), z0.numel())
            J = jacrev(f)(v0).reshape(-1, P)
            M += (-1 if kind == "oba" else 1) * (J.T @ Hl @ J)
    out = {kind: M / len(data), "names": names, "v0": v0, "unflat": unflat, "params": tp}
    _BRUTE[key] = out
    return out


def _random_v(params, seed, partial=False):
    g = torch.Generator().manual_seed(seed)
    names = list(params)
    keep = names[::2] if partial else names
    return {n: torch.randn(params[n].shape, generator=g, dtype=torch.float64) for n in keep}


def _flat(d, names):
    return torch.cat([d[n].reshape(-1) for n in names])


def _assert_dict(got, want, what):
    """Every tensor to FLOAT64_RTOL relative; a tensor the brute force puts at rounding level
    (≤ 1e-13 of the whole product: zero by structure, e.g. Ĥv at the last layer's bias, where
    C = 0) must be at most FLOAT64_RTOL of the whole product in the engine."""
    assert set(got) == set(want), f"{what}: names {sorted(got)} != {sorted(want)}"
    total = math.sqrt(sum(float(w.double().square().sum()) for w in want.values()))
    assert total > 0, f"{what}: the brute-force product is all zero (a vacuous check)"
    for n in want:
        if float(want[n].double().norm()) <= ZERO_IN_PRODUCT * total:
            assert float(got[n].double().norm()) <= FLOAT64_RTOL * total, f"{what} {n}: not ~0"
        else:
            assert_close_rel(got[n], want[n], f"{what} {n}")


# ------------------------------------------------------------------------- hvp vs brute force
@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("kind", ["exact", "oba", "ggn"])
@pytest.mark.parametrize("case", list(CASES))
def test_hvp_matches_full_matrices(case, kind, impl):
    model, shape, _ = CASES[case]
    bm = brute_matrix(case, kind)
    if kind == "oba":
        assert bm["oba"].abs().max() > DEGENERATE, "degenerate case: Ĥ vanishes"
    for seed, partial in ((0, False), (1, True)):
        v = _random_v(bm["params"], seed, partial)
        got = oba_ext.hvp(model, _case_data(case), v, kind=kind, impl=impl)
        vfull = {n: v.get(n, torch.zeros_like(p)) for n, p in bm["params"].items()}
        want = bm["unflat"](bm[kind] @ _flat(vfull, bm["names"]))
        _assert_dict(got, want, f"{case} {kind} {impl} partial={partial}")


@pytest.mark.parametrize("case", list(CASES))
def test_brute_force_ggn_is_symmetric_psd(case):
    """Sanity of the brute force itself: the GGN is symmetric positive semi-definite
    (cross-entropy's H_loss is)."""
    G = brute_matrix(case, "ggn")["ggn"]
    assert_close_rel(G, G.T, f"{case}: GGN symmetric")
    assert torch.linalg.eigvalsh(G).min() > -PSD_ROUNDING * G.abs().max()


# ------------------------------------------------------------------------- v = θ and scores
@pytest.mark.parametrize("kind", ["exact", "oba"])
@pytest.mark.parametrize("case", list(CASES))
def test_v_theta_reproduces_scores(case, kind):
    model, shape, _ = CASES[case]
    data = _case_data(case)
    theta = brute.target_params(model)
    hv = oba_ext.hvp(model, data, theta, kind=kind, impl="kernel")
    res = oba_ext.score(model, data, kind=kind, granularity=("weight", "out", "in"),
                        impl="kernel", progress=False)
    along = oba_ext.score(model, data, kind=kind, granularity=("weight", "out", "in"),
                          impl="kernel", progress=False, direction=theta)
    got, want = {}, {}
    for name, ls in res.items():
        got[f"{name} θ⊙Mθ weight"] = theta[f"{name}.weight"] * hv[f"{name}.weight"]
        want[f"{name} θ⊙Mθ weight"] = ls.weight
        if ls.bias is not None:
            got[f"{name} θ⊙Mθ bias"] = theta[f"{name}.bias"] * hv[f"{name}.bias"]
            want[f"{name} θ⊙Mθ bias"] = ls.bias
        for f in ("weight", "bias", "out", "inp"):
            if getattr(ls, f) is not None:
                got[f"{name} direction=θ {f}"] = getattr(along[name], f)
                want[f"{name} direction=θ {f}"] = getattr(ls, f)
    _assert_dict(got, want, f"{case} {kind}")


def _brute_direction_scores(bm, v, kind, model):
    per = bm["unflat"](_flat(v, bm["names"]) * (bm[kind] @ _flat(v, bm["names"])))
    out = {}
    for name, m in model.named_modules():
        if f"{name}.weight" not in per or isinstance(m, nn.BatchNorm2d):
            continue
        w, b = per[f"{name}.weight"], per.get(f"{name}.bias")
        o = w.reshape(w.shape[0], -1).sum(1)
        out[name] = {"out": o if b is None else o + b,
                     "inp": weight_in(w, getattr(m, "groups", 1)), "weight": w, "bias": b}
    return out


@pytest.mark.parametrize("kind", ["exact", "oba"])
@pytest.mark.parametrize("case, impl", [(c, "kernel") for c in CASES] +
                         [("cnn_bn_train", "reference"), ("attention_qkv", "reference")])
def test_scores_along_a_direction(case, kind, impl):
    model, shape, _ = CASES[case]
    bm = brute_matrix(case, kind)
    v = _random_v(bm["params"], 3)
    res = oba_ext.score(model, _case_data(case), kind=kind, granularity=("weight", "out", "in"),
                        impl=impl, progress=False, direction=v)
    want = _brute_direction_scores(bm, v, kind, model)
    got = {f"{name}.{f}": getattr(res[name], f) for name, d in want.items()
           for f, t in d.items() if t is not None}
    want = {f"{name}.{f}": t for name, d in want.items() for f, t in d.items() if t is not None}
    _assert_dict(got, want, f"{case} {kind} {impl}")


# ------------------------------------------------------------------------- Hutchinson
def _channel_trace_and_variance(H, mask):
    """tr(H_cc) and Var(zᵀ D_c H z) for Rademacher z (D_c: the channel's indicator):
    with S = (D_c H + H D_c)/2, Var = 2 Σ_{i≠j} S_ij²."""
    A = mask[:, None] * H
    S = (A + A.T) / 2
    off = S - torch.diag(torch.diagonal(S))
    return float((mask * torch.diagonal(H)).sum()), float(2 * (off ** 2).sum())


def _channel_masks(bm, model):
    """{(layer, key, index): indicator over the flat parameters} for out and in channels."""
    masks = {}
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        zero = {n: torch.zeros_like(p) for n, p in bm["params"].items()}
        for o in range(m.weight.shape[0]):
            d = dict(zero)
            d[f"{name}.weight"] = torch.zeros_like(m.weight); d[f"{name}.weight"][o] = 1
            if m.bias is not None:
                d[f"{name}.bias"] = torch.zeros_like(m.bias); d[f"{name}.bias"][o] = 1
            masks[(name, "out", o)] = _flat(d, bm["names"])
        groups = getattr(m, "groups", 1)
        cin = m.weight.shape[1] * groups
        for j in range(cin):
            d = dict(zero)
            w = torch.zeros_like(m.weight)
            per_g, og = m.weight.shape[1], m.weight.shape[0] // groups
            gi = j // per_g
            w[gi * og:(gi + 1) * og, j % per_g] = 1
            d[f"{name}.weight"] = w
            masks[(name, "inp", j)] = _flat(d, bm["names"])
    return masks


@pytest.mark.parametrize("case", ["gelu_mlp"])
def test_hutchinson_converges_to_channel_traces(case):
    """Each channel's estimate is a mean of S i.i.d. samples with the variance σ² computed
    from the brute-force Hessian: with a fixed seed, every channel is within 4σ/√S of its
    trace and the normalized squared errors sum to at most K + 4√(2K) (K channels: χ²_K has
    mean K and standard deviation √(2K)), for S = 16 and S = 256 — so the error shrinks as
    1/√S."""
    model, shape, _ = CASES[case]
    data = _data(shape, n=1)
    bm = brute_matrices_one(case, data)
    masks = _channel_masks(bm, model)
    for S in (16, 256):
        res = oba_ext.score(model, data, kind="hessian_trace", granularity=("out", "in"),
                            impl="kernel", progress=False,
                            criterion_options={"num_samples": S, "seed": 7})
        chi2, K = 0.0, 0
        for (name, f, i), mask in masks.items():
            tr, var = _channel_trace_and_variance(bm["exact"], mask)
            est = float(getattr(res[name], f)[i])
            sigma = math.sqrt(var / S)
            if sigma == 0:  # a channel whose block is decoupled: the estimate is exact
                assert abs(est - tr) <= FLOAT64_RTOL * max(abs(tr), 1e-300)
                continue
            assert abs(est - tr) <= 4 * sigma, (f"{case} S={S} {name}.{f}[{i}]: |{est:.6g} − "
                                                f"{tr:.6g}| > 4σ = {4 * sigma:.3g}")
            chi2 += ((est - tr) / sigma) ** 2
            K += 1
        assert chi2 <= K + 4 * math.sqrt(2 * K), f"{case} S={S}: χ² = {chi2:.1f} for K = {K}"


def brute_matrices_one(case, data):
    model, _, _ = CASES[case]
    tp = brute.target_params(model)
    others = {n: p.detach() for n, p in model.named_parameters() if n not in tp}
    names, v0, unflat = brute.flat(tp)
    (x, y), = data
    H = hessian(lambda v: F.cross_entropy(functional_call(
        model, {**others, **_bufs(model), **unflat(v)}, (x,)), y))(v0)
    return {"exact": H, "names": names, "params": tp, "unflat": unflat}


def test_hutchinson_sample_is_exact_direction_score_and_weighting():
    """One Hutchinson sample is exactly score(kind="exact", direction=z) for the documented z
    (so the estimator is unbiased by construction), on both paths; weighted = unweighted ×
    ‖θ_c‖²/n_c."""
    from oba_ext.curvature import rademacher_direction
    model, shape, _ = CASES["gelu_mlp"]
    data = _data(shape, n=2)
    opts = {"num_samples": 1, "seed": 3}
    res = oba_ext.score(model, data, kind="hessian_trace", granularity=("out", "in"),
                        progress=False, criterion_options=opts)
    theta = brute.target_params(model)
    per_batch = [oba_ext.score(model, [b], kind="exact", granularity=("out", "in"),
                               progress=False, direction=rademacher_direction(theta, 3, i, 0))
                 for i, b in enumerate(data)]
    wres = oba_ext.score(model, data, kind="hessian_trace", granularity=("out", "in"),
                         progress=False, criterion_options={**opts, "weighted": True})
    rres = oba_ext.score(model, data, kind="hessian_trace", granularity=("out", "in"),
                         progress=False, criterion_options=opts, impl="reference")
    for name in res:
        assert_close_rel(res[name].out, (per_batch[0][name].out + per_batch[1][name].out) / 2,
                         f"{name} one sample")
        assert_close_rel(rres[name].out, res[name].out, f"{name} reference path")
        assert_close_rel(rres[name].inp, res[name].inp, f"{name} reference path (in)")
        w, b = theta[f"{name}.weight"], theta[f"{name}.bias"]
        norm_out = (w ** 2).sum(1) + b ** 2
        assert_close_rel(wres[name].out, res[name].out * norm_out / (w.shape[1] + 1),
                         f"{name} weighted out")
        assert_close_rel(wres[name].inp, res[name].inp * (w ** 2).sum(0) / w.shape[0],
                         f"{name} weighted in")


# ------------------------------------------------------------------------- the operator
def test_operator_scipy_torch_and_eigsh():
    from scipy.sparse.linalg import LinearOperator, eigsh
    case = "gelu_mlp"
    model, shape, _ = CASES[case]
    data = _case_data(case)
    bm = brute_matrix(case, "exact")
    H = bm["exact"]
    op = oba_ext.curvature_operator(model, data, kind="exact")
    P = H.shape[0]
    assert isinstance(op, LinearOperator) and op.shape == (P, P) and op.dtype == np.float64
    assert op.names == bm["names"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(P, 2, generator=g, dtype=torch.float64)
    assert_close_rel(torch.from_numpy(op.matvec(x[:, 0].numpy())), H @ x[:, 0], "matvec")
    assert_close_rel(torch.from_numpy(op @ x.numpy()), H @ x, "numpy @ matrix")
    assert_close_rel(torch.from_numpy(op.matmat(x.numpy())), H @ x, "matmat")
    assert_close_rel(op @ x[:, 1], H @ x[:, 1], "torch @ vector")
    assert_close_rel(op @ x, H @ x, "torch @ matrix")
    assert_close_rel(torch.from_numpy(op.T @ x[:, 0].numpy()), H @ x[:, 0], "adjoint")
    top = eigsh(op, k=2, which="LA", return_eigenvectors=False, tol=EIGSH_TOL)
    want = torch.linalg.eigvalsh(H)[-2:]
    assert_close_rel(torch.from_numpy(np.sort(top)), want, "top-2 Hessian eigenvalues")
    with pytest.raises(TypeError, match="one-shot"):
        oba_ext.curvature_operator(model, iter(data))
    with pytest.raises(ValueError, match="expected x of shape"):
        op @ torch.zeros(P + 1, dtype=torch.float64)


def test_hutchinson_trace_of_operator():
    """Hutchinson on the operator: within 4σ/√S of tr(GGN), σ² = 2 Σ_{i≠j} GGN_ij²."""
    case = "gelu_mlp"
    model, shape, _ = CASES[case]
    data = _case_data(case)
    G = brute_matrix(case, "ggn")["ggn"]
    op = oba_ext.curvature_operator(model, data, kind="ggn")
    S = 64
    est = oba_ext.hutchinson_trace(op, num_samples=S, seed=0)
    sigma = math.sqrt(2 * ((G - torch.diag(torch.diagonal(G))) ** 2).sum().item() / S)
    assert abs(est - torch.trace(G).item()) <= 4 * sigma


# ------------------------------------------------------------------------- errors, fallbacks
def test_bad_arguments_are_named():
    model, shape, _ = CASES["gelu_mlp"]
    data = _data(shape, n=1)
    theta = brute.target_params(model)
    with pytest.raises(ValueError, match="'nope' is not a target parameter"):
        oba_ext.hvp(model, data, {"nope": torch.zeros(1)})
    with pytest.raises(ValueError, match="does not match the parameter's"):
        oba_ext.hvp(model, data, {"fc1.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="expected a dict"):
        oba_ext.hvp(model, data, [theta["fc1.weight"]])
    with pytest.raises(ValueError, match="kind: expected one of"):
        oba_ext.hvp(model, data, theta, kind="fisher")
    with pytest.raises(ValueError, match="no batch"):
        oba_ext.hvp(model, [], theta)
    with pytest.raises(ValueError, match="does not move along a direction"):
        oba_ext.score(model, data, kind="taylor", direction=theta, progress=False)
    with pytest.raises(ValueError, match="has no option 'samples'"):
        oba_ext.score(model, data, kind="hessian_trace", progress=False,
                      criterion_options={"samples": 3})
    with pytest.raises(ValueError, match="num_samples"):
        oba_ext.score(model, data, kind="hessian_trace", progress=False,
                      criterion_options={"num_samples": 0})
    with pytest.raises(ValueError, match="has no option"):
        oba_ext.score(model, data, kind="oba", progress=False, criterion_options={"seed": 1})


class MHANet(nn.Module):
    """Self-attention with a packed in_proj, or (``separate``) cross-attention whose key/value
    width differs (q/k/v_proj_weight), optionally without biases."""

    def __init__(self, separate=False, bias=True):
        super().__init__()
        kw = dict(kdim=6, vdim=6) if separate else {}
        self.separate = separate
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True, bias=bias, **kw)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        k, v = (x[..., :6], x[..., 2:]) if self.separate else (x, x)
        return self.fc(torch.tanh(self.mha(x, k, v, need_weights=False)[0]).mean(1))


@pytest.mark.parametrize("layout", ["packed", "separate", "packed-nobias"])
@pytest.mark.parametrize("kind", ["exact", "oba", "ggn"])
def test_multihead_attention_matches_full_matrices(kind, layout):
    """nn.MultiheadAttention moves along any direction on the engine (its q/k/v projections
    and out_proj): brute force for exact and ggn, the Φ-oracle for oba."""
    torch.manual_seed(0)
    model = MHANet(separate=layout == "separate", bias=layout != "packed-nobias").double().eval()
    data = _data((2, 4, 8), n=1)
    (x, y), = data
    tp = brute.target_params(model)
    v = _random_v(tp, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback: the engine runs it
        got = oba_ext.hvp(model, data, v, kind=kind, impl="kernel")
    if kind == "oba":
        want = oba_ext.hvp(model, data, v, kind=kind, impl="reference")
    else:
        want = _brute_product(model, x, y, v, kind, brute.flat(tp)[2])
    assert set(got) == set(tp)
    _assert_dict(got, want, f"mha {layout} {kind}")


@pytest.mark.parametrize("kind", ["exact", "oba"])
def test_multihead_attention_scores_along_a_direction(kind):
    torch.manual_seed(0)
    model = MHANet().double().eval()
    data = _data((2, 4, 8), n=1)
    v = _random_v(brute.target_params(model), 8)
    kw = dict(kind=kind, direction=v, granularity=("out", "in", "weight"), progress=False)
    got = oba_ext.score(model, data, impl="kernel", **kw)
    want = oba_ext.score(model, data, impl="reference", **kw)
    for layer in want:
        for key, t in want[layer].tensors().items():
            if kind == "oba" and (layer, key) == ("fc", "bias"):  # Ĥ: no loss curvature, 0
                assert not getattr(got[layer], key).any() and not t.any()
                continue
            assert_close_rel(got[layer].tensors()[key], t, f"{kind} {layer}.{key}")


def test_a_kind_without_engine_directions_falls_back_or_refuses(monkeypatch):
    """LayerKind.engine_direction=False (a new kind whose rule moves along θ only): curvature
    products fall back to the reference path under "auto" (warning naming the layer) and
    raise under "kernel" — never a silent move along θ."""
    import dataclasses

    from oba_ext.layers import KINDS
    monkeypatch.setitem(KINDS, "linear", dataclasses.replace(KINDS["linear"],
                                                            engine_direction=False))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = _data((3, 4))
    v = _random_v(brute.target_params(model), 9)
    with pytest.raises(RuntimeError, match="Linear target '0': the engine moves it along"):
        oba_ext.hvp(model, data, v, impl="kernel")
    with pytest.warns(UserWarning, match="fall back to the reference path"):
        got = oba_ext.hvp(model, data, v, impl="auto")
    _assert_dict(got, oba_ext.hvp(model, data, v, impl="reference"), "fallback")


def test_model_state_untouched():
    model, shape, _ = CASES["cnn_bn_train"]
    before = {k: t.clone() for k, t in model.state_dict().items()}
    oba_ext.hvp(model, _data(shape, n=1), brute.target_params(model), kind="ggn")
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------------- float32 vs curvlinops
def test_float32_against_curvlinops_resnet18():
    """SPEC §7 float32 rule: the engine's float32 Hv on resnet18 is at most 2× as far from the
    float64 product as curvlinops' float32 Hv (+ the float32 floor)."""
    curvlinops = pytest.importorskip("curvlinops")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m64 = torchvision.models.resnet18(num_classes=10).double().eval()
    g = torch.Generator().manual_seed(0)
    data64 = [(torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64),
               torch.randint(0, 10, (2,), generator=g))]
    theta = brute.target_params(m64)
    v64 = _random_v(theta, 0)
    ref = oba_ext.hvp(m64, data64, v64, kind="exact", impl="reference")  # double backward
    m32 = copy.deepcopy(m64).float()
    data32 = [(x.float(), y) for x, y in data64]
    v32 = {n: t.float() for n, t in v64.items()}
    ours = oba_ext.hvp(m32, data32, v32, kind="exact", impl="kernel")
    names = list(theta)
    params = [dict(m32.named_parameters())[n] for n in names]
    for p in m32.parameters():
        p.requires_grad_(any(p is q for q in params))
    op = curvlinops.HessianLinearOperator(m32, nn.CrossEntropyLoss(), params, data32,
                                          check_deterministic=False)
    peer = op @ [v32[n] for n in names]
    peer = dict(zip(names, peer))
    flat = lambda d: torch.cat([d[n].reshape(-1).double() for n in names])
    assert_matches(flat(ours), flat(ref), flat(peer), dtype=torch.float32,
                   what="resnet18 float32 Hv vs curvlinops")


# ------------------------------------------------------------------------- criterion users
def test_hessian_trace_through_obaimportance_and_cli(tmp_path):
    """OBAImportance passes criterion_options through score_kwargs (same numbers as score());
    the CLI scores with the criterion's defaults."""
    tp = pytest.importorskip("torch_pruning")
    from oba_ext import cli
    from oba_ext.pruning import OBAImportance
    model, shape, _ = CASES["cnn_bn_eval"]
    model = copy.deepcopy(model).float()
    data = [(x.float(), y) for x, y in _data(shape, n=1)]
    opts = {"num_samples": 2, "seed": 5}
    imp = OBAImportance(kind="hessian_trace", batches=data, model=model,
                        score_kwargs={"criterion_options": opts})
    res = imp.scores_for(model)
    want = oba_ext.score(model, data, kind="hessian_trace", criterion_options=opts,
                         progress=False)
    for name in want:
        assert torch.equal(res[name].out, want[name].out), name
    pruner = tp.pruner.MetaPruner(model, data[0][0], importance=imp, pruning_ratio=0.25,
                                  ignored_layers=[model.fc])
    pruner.step()
    assert model.conv1.out_channels < 3 or model.conv2.out_channels < 4
    out = tmp_path / "s"
    rc = cli.main(["score", "--model", "small_cnn", "--dataset", "synthetic", "--image-size", "8",
                   "--batch-size", "4", "--num-batches", "1", "--no-progress", "--criterion",
                   "hessian_trace", "--out", str(out)])
    assert rc == 0
    scores = torch.load(out / "scores.pt")
    assert all(torch.isfinite(d["out"]).all() for d in scores.values())


class Decoder(nn.Module):
    """ConvTranspose layers (engine rules with a direction) and a conv."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose2d(3, 4, 2, stride=1, groups=1, bias=False)
        self.conv = nn.Conv2d(4, 3, 3)

    def forward(self, x):
        return self.conv(torch.tanh(self.up2(F.gelu(self.up(x))))).mean((2, 3))


class EmbedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, idx):
        return self.fc(torch.tanh(self.emb(idx)).mean(1))


def _brute_product(model, x, y, v, kind, params):
    """Brute-force ``M v`` ({name: tensor}) for kind "exact" (the torch.func Hessian of the
    cross-entropy) or "ggn" (``J_zᵀ H_loss J_z``), with ``params(w)`` mapping the flat vector
    of target parameters to the parameter dict of ``model``."""
    names, v0, unflat = brute.flat(brute.target_params(model))

    def f(w):
        with sdpa_kernel([SDPBackend.MATH]):  # the fused CPU SDPA kernel has no forward AD
            return functional_call(model, params(w), (x,))
    if kind == "exact":
        M = hessian(lambda w: F.cross_entropy(f(w), y))(v0)
    else:
        z0 = f(v0).detach()
        Hl = hessian(lambda z: F.cross_entropy(z, y))(z0).reshape(z0.numel(), z0.numel())
        J = jacrev(f)(v0).reshape(-1, v0.numel())
        M = J.T @ Hl @ J
    return unflat(M @ _flat(v, names))


@pytest.mark.parametrize("kind", ["exact", "oba", "ggn"])
def test_conv_transpose_matches_full_matrices(kind):
    torch.manual_seed(0)
    model = Decoder().double().eval()
    data = _data((2, 2, 3, 3), n=1)
    (x, y), = data
    tp = brute.target_params(model)
    v = _random_v(tp, 4)
    got = oba_ext.hvp(model, data, v, kind=kind, impl="kernel")
    if kind == "oba":  # no linearized twin here: the Φ-oracle (checked against brute force on
        # the cases above) is the reference
        want = oba_ext.hvp(model, data, v, kind=kind, impl="reference")
    else:
        want = _brute_product(model, x, y, v, kind, brute.flat(tp)[2])
    _assert_dict(got, want, f"conv_transpose {kind}")


@pytest.mark.parametrize("padding_idx", [None, 2])
@pytest.mark.parametrize("kind", ["exact", "oba", "ggn"])
def test_embedding_matches_full_matrices(kind, padding_idx):
    """nn.Embedding moves along any direction on the engine: (Mv)_W = Σ_{idx=v} C. Brute force
    (torch.func Hessian / J_zᵀH_lossJ_z) for exact and ggn; oba against the Φ-oracle. The
    padding_idx row is a constant (torch gives it no gradient): its direction entries are
    ignored and its product row is 0 on both paths."""
    torch.manual_seed(0)
    model = EmbedNet().double().eval()
    model.emb.padding_idx = padding_idx
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 7, (3, 5), generator=g)
    idx[0, 0] = 2  # padding_idx is read
    data = [(idx, torch.randint(0, 3, (3,), generator=g))]
    (x, y), = data
    tp = brute.target_params(model)
    unflat = brute.flat(tp)[2]
    v = _random_v(tp, 5)
    got = oba_ext.hvp(model, data, v, kind=kind, impl="kernel")
    if kind == "oba":
        want = oba_ext.hvp(model, data, v, kind=kind, impl="reference")
    else:
        keep = torch.ones_like(tp["emb.weight"])
        if padding_idx is not None:
            keep[padding_idx] = 0  # a constant: no direction, no product

        def params(w):
            p = unflat(w)
            p["emb.weight"] = p["emb.weight"] * keep + tp["emb.weight"].detach() * (1 - keep)
            return p
        want = _brute_product(model, x, y, v, kind, params)
        ref = oba_ext.hvp(model, data, v, kind=kind, impl="reference")
        _assert_dict(ref, want, f"embedding {kind} reference vs brute force")
    _assert_dict(got, want, f"embedding {kind} padding_idx={padding_idx}")
    if padding_idx is not None:
        assert not got["emb.weight"][padding_idx].any()


@pytest.mark.parametrize("kind", ["exact", "oba"])
def test_embedding_scores_along_a_direction(kind):
    """score(direction=v) on the engine equals the reference path for an Embedding target,
    every key (out: embedding dims, in: vocabulary rows, weight)."""
    torch.manual_seed(0)
    model = EmbedNet().double().eval()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 7, (3, 5), generator=g), torch.randint(0, 3, (3,), generator=g))]
    v = _random_v(brute.target_params(model), 6)
    gran = ("out", "in", "weight")
    got = oba_ext.score(model, data, kind=kind, direction=v, granularity=gran, impl="kernel",
                        progress=False)
    want = oba_ext.score(model, data, kind=kind, direction=v, granularity=gran,
                         impl="reference", progress=False)
    for layer in ("emb", "fc"):
        for key, t in want[layer].tensors().items():
            if kind == "oba" and (layer, key) == ("fc", "bias"):  # Ĥ: no loss curvature, 0
                assert not getattr(got[layer], key).any() and not t.any()
                continue
            assert_close_rel(getattr(got[layer], key), t, f"{kind} {layer}.{key}")


def test_bench_scoring_curvature_providers_compute_the_same_thing():
    """The benchmark's providers time the same products: the engine's Hv / GGN·v / Hutchinson
    sample against torch.func and, when installed, curvlinops and BackPACK (float64)."""
    from benchmarks import bench_scoring as bs
    torch.manual_seed(0)
    model = bs.TinyCNN(3).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=g)
    provs = bs.providers_for(model, x, y, "kernel", None)
    names = list(bs._theta(model))
    as_dict = lambda r: r if isinstance(r, dict) else dict(zip(names, r))
    runs = {p: provs[p](None).fn() for p in provs
            if p.startswith(("hvp[", "hessian_trace", "jvp_grad:h", "curvlinops", "backpack"))}
    for kind, peer_prefix in (("exact", "hvp"), ("ggn", "ggn")):
        ours = runs[f"hvp[{kind}]"]
        peers = [p for p in runs if p.endswith(f":{peer_prefix}") and ":hessian" not in p]
        assert peers, "no peer ran"
        for p in peers:
            _assert_dict(as_dict(runs[p]), ours, f"{p} vs hvp[{kind}]")
    ours = {layer: d["exact"]["out"] for layer, d in runs["hessian_trace[out]"].items()}
    for p in [p for p in runs if p.endswith("hessian_trace[out]") and p != "hessian_trace[out]"]:
        _assert_dict(runs[p], ours, f"{p} vs hessian_trace[out]")


def test_tied_parameter_named_by_its_second_owner():
    """A direction for a tied LM head names the parameter it shares (one parameter, scored and
    moved under its first owner)."""
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 6, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, i):
            return self.head(torch.tanh(self.emb(i)).mean(1))
    m = Tied().double()
    data = [(torch.randint(0, 6, (3, 4)), torch.randint(0, 6, (3,)))]
    v = {"head.weight": torch.randn(6, 4, dtype=torch.float64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied: scored once under its first owner
        with pytest.raises(ValueError, match="'head.weight' is the same parameter as "
                                             "'emb.weight'.*pass it as 'emb.weight'"):
            oba_ext.hvp(m, data, v)
        with pytest.raises(ValueError, match="pass it as 'emb.weight'"):
            oba_ext.score(m, data, kind="exact", direction=v, progress=False)
