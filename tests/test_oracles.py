"""The reference oracles (SPEC §7) against brute force on tiny float64 models.

Brute force: ``exact`` from the full Hessian (``torch.func.hessian`` of the loss); ``oba`` from
``H_lin − GGN``, the Hessian of the network with every non-bilinear op linearized at its forward
value, minus the Gauss-Newton matrix (tests/tiny_models.py). Tolerance: SPEC §7, float64 ≤ 1e-10.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import hessian, jacrev

import oba_ext
import brute
import tiny_models as tm

from tolerances import (BN_DEFAULT_EPS_VANISH, BN_TINY_EPS, BN_TINY_EPS_VANISH, DEGENERATE, SURVIVES,
                        ANALYTIC_ZERO_MAX, F64_FORWARD, F64_SAME_FORMULA, FLOAT64_RTOL, assert_f64, rel_err)


def norm_all(d):
    return torch.cat([t.reshape(-1).double() for t in d.values()]).norm().item()


def assert_close(a, b, tol=FLOAT64_RTOL, what="", scale=0.0):
    """Per tensor (SPEC §7). ``scale`` (the model's score norm) is used only for a value that is
    analytically zero (a bias or output channel before a train-mode BN, tolerances.ANALYTIC_ZERO):
    such a value must be ≤ ANALYTIC_ZERO_MAX × scale and is compared on that scale."""
    if tol == FLOAT64_RTOL and scale > 0 and b.double().norm().item() <= ANALYTIC_ZERO_MAX * scale:
        assert_f64(a, b, what, "bn_train", scale)
        return
    err = rel_err(a, b)
    d = (a.double() - b.double()).abs()
    assert err <= tol, f"{what}: rel err {err:.3e} > {tol:.1e} (max abs diff {d.max():.3e}, mean {d.mean():.3e})"


def brute_exact(model, x, y, loss=F.cross_entropy):
    """θ ⊙ Hθ from the full Hessian of the loss over the target parameters."""
    return brute.hessian_and_ggn_scores(model, x, y, loss, with_ggn=False)[0]


def brute_oba(fn, model, x, y, loss=F.cross_entropy):
    """θ ⊙ (H_lin − GGN)θ with the functional twin ``fn(params, x, nl)``."""
    tp = brute.target_params(model)
    allp = {n: p.detach() for n, p in model.named_parameters()}
    names, v0, unflat = brute.flat(tp)
    lin = tm.Linearizer()
    z0 = fn(allp, x, lin)
    lin.start_linearized()

    def f(v):
        lin.i = 0
        return fn({**allp, **unflat(v)}, x, lin)
    H = hessian(lambda v: loss(f(v), y))(v0)
    J = jacrev(f)(v0).reshape(-1, v0.numel())
    Hl = hessian(lambda z: loss(z, y))(z0.detach()).reshape(z0.numel(), z0.numel())
    ggn = J.T @ Hl @ J
    return {n: tp[n] * hv for n, hv in unflat((H - ggn) @ v0).items()}


def engine_per_weight(model, x, y, kind, impl="reference"):
    res = oba_ext.score(model, [(x, y)], kind=kind, granularity=("weight", "out", "in"),
                        progress=False, impl=impl)
    out = {}
    for name, ls in res.items():
        out[f"{name}.weight"] = ls.weight
        if ls.bias is not None:
            out[f"{name}.bias"] = ls.bias
    return out, res


def _cases():
    torch.manual_seed(0)
    mlp = tm.MLP().double()
    x_mlp = torch.randn(6, 5, dtype=torch.float64)
    cnn = tm.CNN().double()
    for m in cnn.modules():  # non-trivial BN statistics and affine
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.5, 0.5)
    x_cnn = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    res = tm.ResCNN().double()
    res.bn.running_mean.uniform_(-0.5, 0.5); res.bn.running_var.uniform_(0.5, 2.0)
    x_res = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    att = tm.AttnBlock().double()
    att.norm.weight.data.uniform_(0.5, 1.5); att.norm.bias.data.uniform_(-0.3, 0.3)
    x_att = torch.randn(2, 5, 8, dtype=torch.float64)
    bufs = lambda m: {n: b for n, b in m.named_buffers()}
    return {
        "gelu_mlp": (mlp.eval(), x_mlp, lambda p, x, nl: tm.mlp_fn(p, x, nl)),
        "cnn_bn_eval": (cnn.eval(), x_cnn, lambda p, x, nl: tm.cnn_fn(p, x, nl, bufs(cnn), False)),
        "cnn_bn_train": (copy.deepcopy(cnn).train(), x_cnn,
                         lambda p, x, nl: tm.cnn_fn(p, x, nl, bufs(cnn), True)),
        "residual_cnn": (res.eval(), x_res, lambda p, x, nl: tm.rescnn_fn(p, x, nl, bufs(res))),
        "attention_qkv": (att.eval(), x_att, lambda p, x, nl: tm.attn_fn(p, x, nl)),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_twin_is_the_model(case):
    model, x, fn = CASES[case]
    p = {n: q.detach() for n, q in model.named_parameters()}
    with torch.no_grad():
        assert_close(fn(p, x, tm.plain), model(x), F64_SAME_FORMULA, case)


@pytest.mark.parametrize("case", list(CASES))
def test_exact_matches_full_hessian(case):
    model, x, _ = CASES[case]
    y = torch.arange(x.shape[0]) % 3
    got, _ = engine_per_weight(model, x, y, "exact")
    want = brute_exact(model, x, y)
    scale = norm_all(want)
    for n in want:
        assert_close(got[n], want[n], what=f"{case} {n}", scale=scale)


@pytest.mark.parametrize("case", list(CASES))
def test_oba_matches_linearized_hessian_minus_ggn(case):
    model, x, fn = CASES[case]
    y = torch.arange(x.shape[0]) % 3
    got, _ = engine_per_weight(model, x, y, "oba")
    want = brute_oba(fn, model, x, y)
    total = torch.cat([w.reshape(-1) for w in want.values()])
    assert total.abs().max() > DEGENERATE, "degenerate case: brute-force scores vanish"
    scale = norm_all(want)
    for n in want:
        assert_close(got[n], want[n], what=f"{case} {n}", scale=scale)


@pytest.mark.parametrize("case", list(CASES))
def test_taylor_is_theta_times_gradient(case):
    model, x, _ = CASES[case]
    y = torch.arange(x.shape[0]) % 3
    got, _ = engine_per_weight(model, x, y, "taylor")
    m = copy.deepcopy(model)
    F.cross_entropy(m(x), y).backward()
    want = {n: p.detach() * p.grad for n, p in m.named_parameters() if n in got}
    scale = norm_all(want)
    for name in want:
        assert_close(got[name], want[name], what=f"{case} {name}", scale=scale)


def test_oba_is_hessian_minus_ggn_for_relu_eval_bn():
    """SPEC §2: for a ReLU network with eval-mode BN and no attention, Ĥ = H − GGN."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 2), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(5, 2, 7, 7, dtype=torch.float64)
    y = torch.arange(5) % 3
    _, want = brute.hessian_and_ggn_scores(model, x, y)
    got, _ = engine_per_weight(model, x, y, "oba")
    scale = norm_all(want)
    for n in want:
        assert_close(got[n], want[n], what=n, scale=scale)


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_homogeneous_chain_identity(depth):
    """SPEC §7.3: bias-free ReLU chain of L target layers: oba = (L−1)·θ⊙∇L, per layer."""
    torch.manual_seed(depth)
    dims = [6, 7, 5, 6, 4][: depth + 1]
    mods = []
    for i in range(depth):
        mods += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.ReLU()]
    model = nn.Sequential(*mods[:-1]).double()
    x = torch.randn(8, dims[0], dtype=torch.float64)
    y = torch.arange(8) % dims[-1]
    oba, _ = engine_per_weight(model, x, y, "oba")
    tay, _ = engine_per_weight(model, x, y, "taylor")
    scale = norm_all(tay)
    for n in oba:
        assert_close(oba[n], (depth - 1) * tay[n], what=n, scale=scale)


@pytest.mark.parametrize("eps,tol", [(BN_TINY_EPS, BN_TINY_EPS_VANISH), (1e-5, BN_DEFAULT_EPS_VANISH)])
def test_train_mode_bn_kills_conv_output_scores(eps, tol):
    """SPEC §7.3: conv → train-mode BN: every conv's output-channel oba score is ≈ 0 (BN is
    scale-invariant per channel; exactly so as eps → 0, up to eps/var with the default eps)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, eps=eps), nn.ReLU(),
                          nn.Conv2d(4, 5, 3, bias=False), nn.BatchNorm2d(5, eps=eps), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().train()
    x = torch.randn(6, 3, 9, 9, dtype=torch.float64)
    y = torch.arange(6) % 3
    res = oba_ext.score(model, [(x, y)], kind="oba", progress=False, impl="reference")
    ref = oba_ext.score(model.eval(), [(x, y)], kind="oba", progress=False, impl="reference")
    for name in ("0", "3"):
        scale = ref[name].out.abs().max()
        assert scale > DEGENERATE
        assert res[name].out.abs().max() <= tol * scale, name
        assert res[name].inp.abs().max() > SURVIVES * scale  # input-side scores survive


def test_mha_matches_equivalent_qkv_block():
    """nn.MultiheadAttention (packed in_proj) scores equal the same block written with a qkv
    Linear feeding SDPA, in oba and exact mode."""
    torch.manual_seed(3)
    att = tm.AttnBlock().double().eval()
    att.norm.weight.data.uniform_(0.5, 1.5)

    class MHABlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.head = att.norm, att.head
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True).double()
            self.attn.in_proj_weight.data.copy_(att.qkv.weight)
            self.attn.in_proj_bias.data.copy_(att.qkv.bias)
            self.attn.out_proj.weight.data.copy_(att.proj.weight)
            self.attn.out_proj.bias.data.copy_(att.proj.bias)

        def forward(self, x):
            h = self.norm(x)
            return self.head((x + self.attn(h, h, h, need_weights=False)[0]).mean(1))

    mb = MHABlock().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y = torch.arange(3) % 3
    assert_close(mb(x), att(x), F64_SAME_FORMULA, "forward")
    for kind in ("oba", "exact"):
        a = oba_ext.score(att, [(x, y)], kind=kind, granularity=("out", "in", "weight"), progress=False,
                          impl="reference")
        b = oba_ext.score(mb, [(x, y)], kind=kind, granularity=("out", "in", "weight"), progress=False,
                          impl="reference")
        assert_close(b["attn"].weight, a["qkv"].weight, what=f"{kind} in_proj")
        assert_close(b["attn"].out, a["qkv"].out, what=f"{kind} in_proj out")
        assert_close(b["attn"].inp, a["qkv"].inp, what=f"{kind} in_proj in")
        assert_close(b["attn.out_proj"].weight, a["proj"].weight, what=f"{kind} out_proj")
        q, k, v = a["qkv"].out.chunk(3)
        assert_close(b["attn"].parts["k.out"], k, what=f"{kind} k part")


@pytest.mark.parametrize("case", ["cnn_bn_eval", "residual_cnn", "attention_qkv"])
@pytest.mark.parametrize("kind", ["oba", "exact", "taylor"])
def test_structured_sums_equal_per_weight(case, kind):
    """out = row sums + bias, in = column sums over the rows that read the channel (groups)."""
    model, x, _ = CASES[case]
    y = torch.arange(x.shape[0]) % 3
    _, res = engine_per_weight(model, x, y, kind)
    for name, ls in res.items():
        mod = dict(model.named_modules())[name]
        w = ls.weight
        out = w.reshape(w.shape[0], -1).sum(1) + (ls.bias if ls.bias is not None else 0)
        assert_close(ls.out, out, what=f"{name} out")
        g = getattr(mod, "groups", 1)
        cin_g = w.shape[1]
        want_in = torch.zeros(cin_g * g, dtype=w.dtype)
        for o in range(w.shape[0]):  # naive loop: row o reads channels of its group
            grp = o // (w.shape[0] // g)
            want_in[grp * cin_g:(grp + 1) * cin_g] += w[o].reshape(cin_g, -1).sum(1)
        assert_close(ls.inp, want_in, what=f"{name} in")


@pytest.mark.parametrize("kind", ["oba", "exact", "taylor"])
def test_inplace_ops_after_products(kind):
    """In-place ops that overwrite a product's output (VGG's conv → ReLU(inplace), an in-place
    residual add) give the same scores as the out-of-place model, and match brute force."""
    torch.manual_seed(4)

    class Net(nn.Module):
        def __init__(self, inplace):
            super().__init__()
            self.inplace = inplace
            self.c1, self.c2 = nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding=1)
            self.fc1, self.fc2 = nn.Linear(3 * 16, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = F.relu(self.c1(x), inplace=self.inplace)
            r = self.c2(h)
            if self.inplace:
                r.add_(h)          # in-place residual join on the conv output
                r = F.relu_(r)
            else:
                r = F.relu(r + h)
            z = F.relu(self.fc1(r.flatten(1)), inplace=self.inplace)
            return self.fc2(z)

    a, b = Net(True).double(), Net(False).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    y = torch.arange(4) % 3
    with torch.no_grad():
        assert_close(a(x), b(x), F64_FORWARD, "forward")
    ga, _ = engine_per_weight(a, x, y, kind)
    gb, _ = engine_per_weight(b, x, y, kind)
    exact, oba = brute.hessian_and_ggn_scores(b, x, y)
    want = {"oba": oba, "exact": exact}.get(kind, gb)
    scale = norm_all(want)
    for n in gb:
        assert_close(ga[n], gb[n], what=f"inplace vs out-of-place {n}", scale=scale)
        assert_close(gb[n], want[n], what=f"vs brute force {n}", scale=scale)
