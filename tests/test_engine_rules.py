"""Engine rules one family at a time (tiny float64 models vs the reference oracles), the generic
rule and its warning, capture errors, weight sharing, norm-layer scores, and the end-to-end
``oba_ext.score(..., impl="kernel")`` path."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from oba_ext.engine import CaptureError, build_scorer
from oba_ext.engine import kernels as engine_kernels
from oba_ext.engine.rules import generic
from oba_ext.reference import ReferenceScorer
from oba_ext.scoring import checked_loss, default_loss
from oba_ext.targets import find_layers
from test_engine import KEYS, QUANTITIES, assert_float32_rule, compare
from tolerances import assert_close_rel, assert_matches

D = torch.float64


def _xy(*shape, classes=4, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *shape, generator=g, dtype=D),
            torch.randint(0, classes, (n,), generator=g))


class Acts(nn.Module):
    """Every activation rule, module and functional forms, in-place variants included."""

    def __init__(self, c=6, inplace=True):
        super().__init__()
        self.inplace = inplace
        self.fcs = nn.ModuleList(nn.Linear(c, c) for _ in range(11))
        self.mods = nn.ModuleList([nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.Tanh(), nn.Hardswish(),
                                   nn.LeakyReLU(0.1), nn.ReLU6(inplace=True), nn.ReLU(inplace=True)])
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        for fc, act in zip(self.fcs, self.mods):
            x = act(fc(x) * 2.0)
        x = F.gelu(self.fcs[8](x), approximate="tanh")
        x = torch.tanh(self.fcs[9](x)).relu()
        x = F.relu(self.fcs[10](x), inplace=self.inplace)
        return self.head(x)


def test_activations_all_quantities():
    torch.manual_seed(0)
    m = Acts().double()
    compare(m, *_xy(6))


class Joins(nn.Module):
    """Residual add/sub, concat, gated product (SPEC §3 product rule), matmul of two
    activations, shape ops, division by a constant."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(4, 6)
        self.c = nn.Linear(12, 6, bias=False)
        self.d = nn.Linear(6, 6)
        self.head = nn.Linear(9, 3)

    def forward(self, x):                                  # x: (B, T, 4)
        a, b = self.a(x), self.b(x)
        h = torch.cat([a, torch.relu(b)], dim=-1)          # (B, T, 12)
        h = self.c(h) * torch.sigmoid(self.d(a))           # gated product of two activations
        h = h - 0.5 * a
        att = h @ h.transpose(1, 2) / 3.0                  # (B, T, T): bilinear in h
        o = torch.matmul(att, h).permute(0, 2, 1)          # (B, 6, T)
        o = o.reshape(o.size(0), -1)[:, :9]
        return self.head(-o + 1)


def test_joins_and_products():
    torch.manual_seed(1)
    compare(Joins().double(), *_xy(3, 4, classes=3))


class Convs(nn.Module):
    """Conv1d/Conv2d with stride, dilation, groups (depthwise), padding='same', no bias;
    GroupNorm, BatchNorm1d, pooling (max/avg/adaptive, 1-D and 2-D)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding="same", groups=8)
        self.c2 = nn.Conv2d(8, 6, 3, dilation=2, padding=2, groups=2)
        self.pool = nn.MaxPool2d(2)
        self.c3 = nn.Conv1d(6, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(5)
        self.fc = nn.Linear(5 * 2, 4)

    def forward(self, x):
        h = F.silu(self.gn(self.c1(x)))
        h = F.relu(self.dw(h)) + h
        h = self.pool(F.hardswish(self.c2(h)))             # (B, 6, 2, 2)
        h = F.avg_pool2d(h, 1).flatten(2)                  # (B, 6, 4)
        h = self.bn1(F.gelu(self.c3(h)))                   # (B, 5, 4)
        h = F.max_pool1d(h, 2)                             # (B, 5, 2)
        h = F.adaptive_avg_pool1d(h, 2)
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_convs_norms_pooling(train):
    torch.manual_seed(2)
    m = Convs().double().train(train)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm1d):
            mod.running_mean.uniform_(-0.3, 0.3)
            mod.running_var.uniform_(0.5, 1.5)
    compare(m, *_xy(3, 8, 8, n=4))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


def test_weight_sharing_accumulates():
    torch.manual_seed(3)
    compare(Shared().double(), *_xy(5, classes=3))


class WithSin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.sin(self.fc1(x)))


def test_generic_rule_warns_once_and_is_exact():
    torch.manual_seed(4)
    generic._WARNED.discard("function torch.sin")
    m = WithSin().double()
    with pytest.warns(UserWarning, match=r"no rule for function torch\.sin"):
        compare(m, *_xy(5, classes=3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second use does not warn again
        x, y = _xy(5, classes=3)
        build_scorer(m, find_layers(m), checked_loss(default_loss), (x, y))(x, y, ("exact",), ("out",))


def test_generic_loss_function():
    """A loss without a hand rule goes through autograd (G, and ∇²ℓ·T_z for exact)."""
    torch.manual_seed(5)

    def smooth_l1(out, target):
        return F.smooth_l1_loss(out, target, beta=0.5) + (out ** 4).mean()

    m = WithSin().double()
    x = torch.randn(3, 5, dtype=D)
    y = torch.randn(3, 3, dtype=D)
    compare(m, x, y, loss_fn=smooth_l1)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = x * 2
        return self.fc(x)


def test_untraceable_model_raises_capture_error():
    m = Untraceable().double()
    x, y = _xy(4, classes=2)
    with pytest.raises(CaptureError, match="symbolic tracing of Untraceable failed"):
        build_scorer(m, find_layers(m), checked_loss(default_loss), (x, y))
    with pytest.raises(RuntimeError, match="cannot be captured"):
        oba_ext.score(m, [(x, y)], impl="kernel", progress=False)
    with pytest.warns(UserWarning, match="falling back to the reference path"):
        res = oba_ext.score(m, [(x, y)], impl="auto", progress=False)
    assert res.impl == "reference"


def test_bad_arguments():
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)).double().train()
    x, y = _xy(4, classes=2)
    # train-mode dropout is captured (one mask per batch on both streams: tests/test_edge_products.py)
    scorer = build_scorer(m, find_layers(m), checked_loss(default_loss), (x, y))
    with pytest.raises(ValueError, match="quantities: unknown quantity 'hessian'"):
        scorer(x, y, ("hessian",), ("out",))
    with pytest.raises(ValueError, match="keys: unknown key 'rows'"):
        scorer(x, y, ("oba",), ("rows",))


def test_does_not_modify_model_in_train_mode():
    torch.manual_seed(6)
    m = Convs().double().train()
    before = copy.deepcopy(m.state_dict())
    x, y = _xy(3, 8, 8, n=4)
    build_scorer(m, find_layers(m), checked_loss(default_loss), (x, y))(x, y, QUANTITIES, KEYS)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert all(p.grad is None for p in m.parameters())


def test_norm_layer_taylor_scores():
    """BN/LN/GN channels (kind "norm"): Σ G⊙z = γ ∂L/∂γ + β ∂L/∂β per channel."""
    torch.manual_seed(7)
    m = Convs().double().eval()
    x, y = _xy(3, 8, 8, n=4)
    layers = find_layers(m, include_norm=True)
    loss = checked_loss(default_loss)
    eng = build_scorer(m, layers, loss, (x, y))(x, y, ("taylor",), ("out",))
    ref = ReferenceScorer(m, layers, loss)(x, y, ("taylor",), ("out",))
    for name in ("gn", "bn1"):
        assert_matches(eng[name]["taylor"]["out"], ref[name]["taylor"]["out"], what=name)


def test_score_end_to_end_kernel_matches_reference():
    torch.manual_seed(8)
    m = Convs().double().eval()
    batches = [_xy(3, 8, 8, n=2, seed=s) for s in range(3)]
    for kind in ("oba", "exact", "delta_oba"):
        k = oba_ext.score(m, batches, kind=kind, granularity=("out", "in", "weight"),
                          impl="kernel", progress=False)
        r = oba_ext.score(m, batches, kind=kind, granularity=("out", "in", "weight"),
                          impl="reference", progress=False)
        assert k.impl == "kernel" and r.impl == "reference"
        for name in r:
            for field, ref in r[name].tensors().items():
                assert_matches(k[name].tensors()[field], ref, what=f"{kind} {name} {field}")


def test_kernel_registry_choice():
    """The registry picks the compiled op exactly when the extension has kernels for the device."""
    import glob
    import os

    import oba_ext
    from oba_ext import _ext
    # expectation from the build itself, not from the function under test: a compiled library
    # next to the package (what `make build` produces) must be picked for every op
    built = glob.glob(os.path.join(os.path.dirname(oba_ext.__file__), "_C*.so"))
    which = engine_kernels.which("cpu")
    if built:
        assert all(v.startswith("oba_ext.ops.") for v in which.values()), (built, which)
        assert set(_ext.registered_ops()) >= {"linear_weight_score", "conv_weight_score",
                                              "channel_score_reduce"}
    # and without kernels for a device, every op resolves to its same-named twin
    engine_kernels.resolve.cache_clear()
    real = _ext.kernels_available
    try:
        _ext.kernels_available = lambda device="cpu": False
        for name, fn in engine_kernels.which("cpu").items():
            assert fn.startswith("oba_ext.reference.") and fn.endswith("." + name), (name, fn)
    finally:
        _ext.kernels_available = real
        engine_kernels.resolve.cache_clear()
    assert engine_kernels.which("cpu") == which


class _Enc(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                              batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


def test_transformer_encoder_layer_is_traced_and_matches_oracles():
    """A torch.nn container (nn.TransformerEncoderLayer) must be traced through — its Linear
    layers and its attention scored by their rules — and match the oracles."""
    torch.manual_seed(9)
    m = _Enc().double().eval()
    x, y = _xy(4, 8, classes=3)
    compare(m, x, y)
    assert {"enc.linear1", "enc.linear2", "head"} <= set(find_layers(m))


def test_tied_target_parameter_is_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.head = nn.Linear(4, 7, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            return self.head(torch.tanh(self.emb(ids)).mean(1))

    m = Tied().double()
    ids, y = torch.randint(0, 7, (2, 3)), torch.tensor([1, 2])
    # the tied weight is one parameter: scored once, under its first owner 'emb'
    with pytest.warns(UserWarning, match="head.weight is tied to a parameter of target layer 'emb'"):
        layers = find_layers(m)
    assert list(layers) == ["emb"]
    with pytest.raises(ValueError, match="list only one of 'emb' and 'head'"):
        find_layers(m, targets=["emb", "head"])
    # the engine cannot move a weight used outside its scored layer: refused by name ...
    with pytest.raises(CaptureError, match="uses target parameter 'emb.weight'"):
        build_scorer(m, layers, checked_loss(default_loss), (ids, y))
    # ... so "auto" runs the reference path, which moves the tied parameter in both uses
    w = m.emb.weight.detach()

    def loss_of(wv):
        out = torch.func.functional_call(m, {"emb.weight": wv}, (ids,))  # ties follow
        return torch.nn.functional.cross_entropy(out, y)
    hw = torch.func.jvp(torch.func.grad(loss_of), (w,), (w,))[1]
    with pytest.warns(UserWarning):
        res = oba_ext.score(m, [(ids, y)], kind="exact", granularity="weight", progress=False)
    assert res.impl == "reference"
    assert_close_rel(res["emb"].weight, w * hw, "tied exact θ⊙Hθ")


class Misc(nn.Module):
    """Functional and method forms: F.layer_norm with its own affine, F.dropout (inactive),
    F.relu6 / leaky_relu / hardtanh / silu, x.sigmoid(), stack, squeeze/unsqueeze, expand,
    sum/mean over dims, advanced indexing, avg/adaptive pooling (non-global), nn.Identity."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.ln_w = nn.Parameter(torch.rand(4) + 0.5)
        self.ln_b = nn.Parameter(torch.randn(4) * 0.1)
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.pool = nn.AvgPool2d(2)
        self.ident = nn.Identity()
        self.head = nn.Linear(8, 3)

    def forward(self, x):                                       # (B, 2, 6, 6)
        h = F.relu6(self.conv(x))                               # (B, 4, 6, 6)
        h = F.adaptive_avg_pool2d(self.pool(h), (2, 2))         # (B, 4, 2, 2)
        h = h.flatten(2).transpose(1, 2)                        # (B, 4, 4) tokens
        h = F.layer_norm(h, (4,), self.ln_w, self.ln_b, 1e-5)
        h = F.dropout(h, p=0.3, training=False)
        a = F.leaky_relu(self.fc1(h), 0.2)
        b = F.hardtanh(self.fc2(h), -0.5, 0.5) + a.sigmoid()
        s = torch.stack([a, F.silu(b)], dim=1)                  # (B, 2, 4, 4)
        s = s.unsqueeze(1).squeeze(1).sum(dim=2)                # (B, 2, 4)
        s = s + s.mean(1, keepdim=True).expand(-1, 2, -1)
        s = s[:, torch.tensor([1, 0])]                          # advanced index
        return self.head(self.ident(s.reshape(s.shape[0], -1)))


def test_functional_and_method_forms():
    torch.manual_seed(10)
    compare(Misc().double(), *_xy(2, 6, 6, classes=3))


class _ClampHardsigmoid(nn.Module):
    def forward(self, x):
        return torch.clamp(x / 6 + 0.5, 0, 1)


def test_hardsigmoid():
    """The engine uses σ' = 1/6 exactly; PyTorch's own hardsigmoid backward rounds 1/6 to
    float32 even for float64 (rel. error 3e-8), so the reference runs on the identical
    function written as a clamp (exact autograd, with a double backward)."""
    torch.manual_seed(11)
    m = nn.Sequential(nn.Linear(5, 6), nn.Hardsigmoid(), nn.Linear(6, 6), nn.Tanh(),
                      nn.Linear(6, 3)).double()
    ref = copy.deepcopy(m)
    ref[1] = _ClampHardsigmoid()
    compare(m, *_xy(5, n=4, classes=3), ref_model=ref)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_float32_rule_on_grouped_convs_and_norms(train):
    """SPEC §7 float32 rule on depthwise/grouped/dilated convs, GN and BN1d (eval and train)."""
    torch.manual_seed(12)
    m64 = Convs().double().train(train)
    x64, y = _xy(3, 8, 8, n=4, seed=3)
    assert_float32_rule(m64, x64, y)


class FunctionalLayers(nn.Module):
    """F.linear / F.conv2d with non-target weights (buffers), dtype casts."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.register_buffer("w2", torch.randn(3, 3, 1, 1))
        self.register_buffer("w3", torch.randn(4, 12))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(F.conv2d(self.conv(x).float().double(), self.w2))   # (B, 3, 2, 2)
        h = F.linear(h.flatten(1), self.w3)
        return self.head(torch.sigmoid(h).to(torch.float64))


def test_functional_layers_with_constant_weights():
    torch.manual_seed(13)
    saved = set(generic._WARNED)
    generic._WARNED.clear()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            compare(FunctionalLayers().double(), *_xy(2, 4, 4, classes=3))
    finally:
        generic._WARNED.update(saved)
    assert not [x for x in w if "no rule for" in str(x.message)], "a hand rule is missing"


class Splits(nn.Module):
    """chunk/split/unbind (tuple-valued nodes), one piece unused; a channel shuffle."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x):                                   # (B, 4)
        a, b = self.fc(x).chunk(2, dim=1)                   # (B, 4) each
        p, q, _ = torch.split(torch.tanh(a), [1, 2, 1], 1)  # third piece unused
        r = torch.unbind(b.view(b.shape[0], 2, 2), dim=1)
        s = torch.cat([q, p, r[0][:, :1]], 1)               # (B, 4)
        s = s.view(-1, 2, 2).transpose(1, 2).reshape(-1, 4)  # shuffle
        return self.fc2(torch.relu(s) + r[1].sum(1, keepdim=True))


def test_tuple_outputs_chunk_split_unbind():
    torch.manual_seed(14)
    saved = set(generic._WARNED)
    generic._WARNED.clear()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            compare(Splits().double(), *_xy(4, n=3, classes=3))
    finally:
        generic._WARNED.update(saved)
    assert not [x for x in w if "no rule for" in str(x.message)], "a hand rule is missing"


def test_subclass_overriding_forward_is_traced_not_ruled():
    """torchvision's LayerNorm2d subclasses nn.LayerNorm but permutes around it: the engine
    must run its forward, not the nn.LayerNorm rule (which would normalize over W)."""
    from torchvision.models.convnext import LayerNorm2d
    torch.manual_seed(15)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.norm = LayerNorm2d(4)
            self.fc = nn.Linear(4 * 3 * 3, 3)

        def forward(self, x):
            return self.fc(F.gelu(self.norm(self.conv(x))).flatten(1))

    m = Block().double()
    with torch.no_grad():
        m.norm.weight.uniform_(0.5, 1.5)
        m.norm.bias.uniform_(-0.2, 0.2)
    compare(m, *_xy(3, 3, 3, classes=3))


def test_scored_norm_layer_used_by_hand_is_refused_not_zeroed():
    """A criterion that scores norm channels (jacobian) on a model that uses a BN layer's
    weight outside a norm call: capture refuses (impl="auto" falls back to the exact reference
    path) instead of returning zeros for that layer."""

    class HandBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.bn, self.fc2 = nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)

        def forward(self, x):
            h = self.fc1(x)
            h = (h - self.bn.running_mean) * self.bn.weight + self.bn.bias  # by hand
            return self.fc2(torch.tanh(h))

    m = HandBN().double().eval()
    x, y = _xy(4, classes=3, n=5)
    with pytest.raises(RuntimeError, match="scored norm layer"):
        oba_ext.score(m, [(x, y)], kind="jacobian", impl="kernel", progress=False)
    with pytest.warns(UserWarning, match="falling back to the reference path"):
        r = oba_ext.score(m, [(x, y)], kind="jacobian", impl="auto", progress=False)
    assert r.impl == "reference" and r["bn"].out.abs().max() > 0
    # criteria that do not score norm channels are unaffected
    assert oba_ext.score(m, [(x, y)], kind="oba", impl="kernel", progress=False).impl == "kernel"
