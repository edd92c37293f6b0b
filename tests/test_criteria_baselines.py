"""Baseline criteria (magnitude_l1/l2, random, taylor_abs, fisher, fastoba2/3) against brute-force
implementations of their definitions on tiny float64 models (written here, independent of
``oba_ext.reference``). Tolerance: float64, relative Frobenius error ≤ 1e-10 (SPEC §7)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from tolerances import F64_MERGED_ORDER, assert_close_rel



class TinyCNN(nn.Module):
    """conv(pad) → BN(eval) → ReLU → conv → flatten → Linear → tanh → Linear; input (N, 2, 4, 4)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(16, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        h = self.c2(F.relu(self.bn(self.c1(x))))
        return self.fc2(torch.tanh(self.fc1(h.flatten(1))))


def tiny_cnn():
    torch.manual_seed(0)
    m = TinyCNN().double()
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.weight.uniform_(0.5, 1.5)
        m.bn.bias.uniform_(-0.3, 0.3)
    return m.eval()


def batches(n_batches=3, bs=4, shape=(2, 4, 4), classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, *shape, generator=g, dtype=torch.float64),
             torch.randint(0, classes, (bs,), generator=g)) for _ in range(n_batches)]


TARGETS = ("c1", "c2", "fc1", "fc2")


def channel_sums(m, name, per_param):
    """(out, in) channel sums of per-parameter values of layer ``name`` (groups = 1)."""
    w = per_param[f"{name}.weight"]
    b = per_param.get(f"{name}.bias")
    out = w.reshape(w.shape[0], -1).sum(1) + (b if b is not None else 0)
    inp = w.transpose(0, 1).reshape(w.shape[1], -1).sum(1)
    return out, inp


def params_of(m):
    return {f"{n}.{p}": getattr(getattr(m, n), p) for n in TARGETS for p in ("weight", "bias")}


def run(m, bs, kind, gran=("out", "in")):
    return oba_ext.score(m, bs, kind=kind, granularity=gran, impl="reference", progress=False)


def check_channels(res, m, per_param, finalize=lambda t: t):
    for name in TARGETS:
        out, inp = channel_sums(m, name, per_param)
        assert_close_rel(res[name].out, finalize(out), f"{name}.out")
        assert_close_rel(res[name].inp, finalize(inp), f"{name}.in")


def test_magnitude_l1_l2():
    m, bs = tiny_cnn(), batches()
    p = {k: v.detach() for k, v in params_of(m).items()}
    check_channels(run(m, bs, "magnitude_l1"), m, {k: v.abs() for k, v in p.items()})
    check_channels(run(m, bs, "magnitude_l2"), m, {k: v * v for k, v in p.items()}, torch.sqrt)
    assert all(q.grad is None for q in m.parameters()), "magnitude must not touch .grad"


def test_random_is_seeded_and_batch_independent():
    m = tiny_cnn()
    torch.manual_seed(123)
    a = run(m, batches(1, seed=1), "random")
    torch.manual_seed(123)
    b = run(m, batches(3, seed=2), "random")
    torch.manual_seed(124)
    c = run(m, batches(1, seed=1), "random")
    for name in TARGETS:
        # same seed, other batches: the same values (the 3-batch mean only rounds)
        assert_close_rel(b[name].out, a[name].out, f"{name}.out, other batches", rtol=F64_MERGED_ORDER)
        assert not torch.equal(a[name].out, c[name].out), "another seed: other scores"
        w = m.get_submodule(name).weight
        fan = w[0].numel() + 1
        assert (a[name].out >= 0).all() and (a[name].out < fan).all()
        assert a[name].out.unique().numel() == a[name].out.numel()


def brute_grads(m, x, t):
    m.zero_grad()
    F.cross_entropy(m(x), t).backward()
    out = {k: v.grad.detach().clone() for k, v in params_of(m).items()}
    m.zero_grad()
    return out


def test_taylor_abs():
    m, bs = tiny_cnn(), batches()
    acc = None
    for x, t in bs:
        g = brute_grads(m, x, t)
        vals = {k: (v.detach() * g[k]).abs() for k, v in params_of(m).items()}
        sums = {n: channel_sums(m, n, vals) for n in TARGETS}
        acc = sums if acc is None else {n: (acc[n][0] + sums[n][0], acc[n][1] + sums[n][1])
                                        for n in TARGETS}
    res = run(m, bs, "taylor_abs")
    for n in TARGETS:
        assert_close_rel(res[n].out, acc[n][0] / len(bs), f"{n}.out")
        assert_close_rel(res[n].inp, acc[n][1] / len(bs), f"{n}.in")


def test_fisher_uses_all_samples_of_all_batches():
    """The mean over every sample of every batch, also with unequal batch sizes (5, 5, 2)."""
    m, bs = tiny_cnn(), list(batches(n_batches=3, bs=5))
    bs[-1] = (bs[-1][0][:2], bs[-1][1][:2])
    sq, count = None, 0
    for x, t in bs:  # per-sample gradients one sample at a time: the definition
        for i in range(x.shape[0]):
            g = brute_grads(m, x[i:i + 1], t[i:i + 1])
            g2 = {k: v * v for k, v in g.items()}
            sq = g2 if sq is None else {k: sq[k] + g2[k] for k in sq}
            count += 1
    vals = {k: v.detach() ** 2 * sq[k] / count for k, v in params_of(m).items()}
    res = run(m, bs, "fisher", ("out", "in", "weight"))
    check_channels(res, m, vals)
    for n in TARGETS:
        assert_close_rel(res[n].weight, vals[f"{n}.weight"], f"{n}.weight")
        assert_close_rel(res[n].bias, vals[f"{n}.bias"], f"{n}.bias")


def test_fisher_rejects_train_mode_batchnorm():
    m = tiny_cnn().train()
    with pytest.raises(ValueError, match="bn.*train mode"):
        run(m, batches(1), "fisher")


# ---- FastOBA k-th order terms ------------------------------------------------------------

class TinyMLP(nn.Module):
    def __init__(self, sizes=(3, 4, 2)):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(sizes[0], sizes[1]), nn.Linear(sizes[1], sizes[2])

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def flat_loss(m, x, t):
    names = [n for n, _ in m.named_parameters()]
    shapes = [p.shape for _, p in m.named_parameters()]
    sizes = [p.numel() for _, p in m.named_parameters()]

    def f(flat):
        vals = {n: v.reshape(s) for n, v, s in zip(names, flat.split(sizes), shapes)}
        return F.cross_entropy(torch.func.functional_call(m, vals, (x,)), t)
    theta = torch.cat([p.detach().reshape(-1) for p in m.parameters()])
    return f, theta, names, shapes, sizes


def test_fastoba2_equals_exact_and_brute_hessian():
    torch.manual_seed(3)
    m = TinyMLP((4, 5, 3)).double()
    bs = batches(2, bs=6, shape=(4,))
    acc = 0
    for x, t in bs:
        f, theta, *_ = flat_loss(m, x, t)
        h = torch.autograd.functional.hessian(f, theta)
        acc = acc + theta * (h @ theta)
    want = acc / len(bs)
    r2 = run(m, bs, "fastoba2", ("weight", "out", "in"))
    rx = run(m, bs, "exact", ("weight", "out", "in"))
    got = torch.cat([torch.cat([r2[n].weight.reshape(-1), r2[n].bias]) for n in ("fc1", "fc2")])
    assert_close_rel(got, want, "fastoba2 vs θ⊙Hθ (full Hessian)")
    for n in ("fc1", "fc2"):
        for k in ("weight", "bias", "out", "inp"):
            assert_close_rel(getattr(r2[n], k), getattr(rx[n], k), f"fastoba2 vs exact {n}.{k}")


def test_fastoba3_matches_third_derivative_tensor():
    torch.manual_seed(4)
    m = TinyMLP((3, 4, 2)).double()
    bs = batches(2, bs=5, shape=(3,), classes=2)
    acc, total = 0, 0
    for x, t in bs:
        f, theta, *_ = flat_loss(m, x, t)
        t3 = torch.func.jacfwd(torch.func.jacrev(torch.func.jacrev(f)))(theta)  # (P, P, P)
        acc = acc + theta * torch.einsum("ijk,j,k->i", t3, theta, theta)
        total += torch.einsum("ijk,i,j,k->", t3, theta, theta, theta)
    want = acc / len(bs)
    r3 = run(m, bs, "fastoba3", ("weight",))
    got = torch.cat([torch.cat([r3[n].weight.reshape(-1), r3[n].bias]) for n in ("fc1", "fc2")])
    assert_close_rel(got, want, "fastoba3 vs θ⊙(∇³L·θ·θ)")
    # the per-parameter scores split the third directional derivative D³L[θ,θ,θ]
    assert_close_rel(got.sum(), total / len(bs), "Σ fastoba3 = D³L[θ,θ,θ]")


def test_fastoba3_vanishes_on_a_quadratic_loss():
    m = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    res = oba_ext.score(m, [(x, y)], loss_fn=lambda o, t: ((o - t) ** 2).mean(), kind="fastoba3",
                        granularity="out", impl="reference", progress=False)
    assert torch.count_nonzero(res["0"].out) == 0


def test_reference_only_criteria_refuse_the_kernel_path():
    m, bs = tiny_cnn(), batches(1)
    for kind in ("fastoba2", "fastoba3", "fisher", "taylor_abs", "magnitude_l1", "random"):
        with pytest.raises(ValueError, match="no kernel implementation"):
            oba_ext.score(m, bs, kind=kind, impl="kernel", progress=False)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_fisher_on_attention_model():
    """Per-sample gradients through nn.MultiheadAttention (vmap over functional_call)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    m = torchvision.models.VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2,
                                             hidden_dim=8, mlp_dim=12, num_classes=3).double().eval()
    with torch.no_grad():  # torchvision zero-initialises the head: make every weight non-zero
        for p in m.parameters():
            p.normal_(0, 0.3)
    bs = batches(n_batches=2, bs=3, shape=(3, 8, 8))
    layers = oba_ext.find_layers(m)
    sq, count = {}, 0
    for x, t in bs:
        for i in range(x.shape[0]):
            m.zero_grad()
            F.cross_entropy(m(x[i:i + 1]), t[i:i + 1]).backward()
            for n, s in layers.items():
                g = s.param(s.params[0]).grad
                sq[n] = sq.get(n, 0) + g * g
            count += 1
    m.zero_grad()
    res = run(m, bs, "fisher", ("weight",))
    for n, s in layers.items():
        w = s.param(s.params[0]).detach()
        assert_close_rel(res[n].weight, w * w * sq[n] / count, f"{n}.{s.params[0]}")
