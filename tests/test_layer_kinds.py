"""ConvTranspose1d/2d and nn.Embedding as target layers (issue 10 item 9, issue 14).

Right values: the engine (impl="kernel") against the reference path in float64 for every
kind and granularity; the reference path against brute force (full Hessian, explicit channel
masks) on tiny models; Torch-Pruning groups of these layers get an importance; refusals name
the argument.
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from oba_ext.layers import KINDS, kind_of
from oba_ext.report import channels_per_layer
from tolerances import (FLOAT32_SAME_FORMULA_RTOL, FLOAT64_SAME_FORMULA_RTOL,
                        assert_close_rel)



@pytest.fixture(autouse=True)
def _float64_default():
    """This file's models are built in float64; restore the default for the rest of the suite
    (a module-level set_default_dtype leaked float64 into every later test)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


class ConvT1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(2, 4, 3, stride=2, padding=1, output_padding=1)
        self.up2 = nn.ConvTranspose1d(4, 4, 3, groups=2, dilation=2, bias=False)
        self.fc = nn.Linear(4 * 14, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.up2(torch.tanh(self.up(x)))).flatten(1))


class ConvT2d(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1)
        self.conv = nn.Conv2d(4, 2, 3)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(torch.tanh(self.up(x)))).mean((2, 3)))


class Emb(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(7, 5, padding_idx=padding_idx)
        self.fc1 = nn.Linear(5, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, idx):
        return self.fc2(torch.tanh(self.fc1(torch.tanh(self.emb(idx)))).mean(1))


def _model(name, seed=0):
    torch.manual_seed(seed)
    m = {"convt1d": ConvT1d, "convt2d": ConvT2d, "emb": Emb,
         "emb_pad": lambda: Emb(padding_idx=0)}[name]()
    for p in m.parameters():  # no exact zeros (a zero bias would make checks vacuous)
        p.data.add_(0.05)
    return m.eval()


def _batches(name, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if name.startswith("emb"):
            x = torch.randint(0, 7, (4, 6), generator=g)
            x[0, :2] = 0  # the padding index occurs
        elif name == "convt1d":
            x = torch.randn(4, 2, 5, generator=g)
        else:
            x = torch.randn(4, 3, 4, 4, generator=g)
        out.append((x, torch.randint(0, 3, (4,), generator=g)))
    return out


MODELS = ["convt1d", "convt2d", "emb", "emb_pad"]
NEW = {"convt1d": ["up", "up2"], "convt2d": ["up"], "emb": ["emb"], "emb_pad": ["emb"]}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["oba", "exact", "taylor"])
def test_engine_matches_reference(name, kind):
    m, b = _model(name), _batches(name)
    kw = dict(kind=kind, granularity=("out", "in", "weight"), progress=False)
    ref = oba_ext.score(m, b, impl="reference", **kw)
    eng = oba_ext.score(m, b, impl="kernel", **kw)
    assert eng.impl == "kernel" and set(eng) == set(ref)
    for layer in ref:
        r, e = ref[layer].tensors(), eng[layer].tensors()
        assert set(r) == set(e), (layer, set(r), set(e))
        for key in r:
            if layer not in NEW[name] and not r[key].abs().max() > 0:
                # e.g. the last layer's oba bias score (C = 0 after the loss): exactly zero
                assert not e[key].abs().max() > 0, f"{name} {kind} {layer}.{key}"
                continue
            assert_close_rel(e[key], r[key], f"{name} {kind} {layer}.{key}")
    for layer in NEW[name]:
        assert ref[layer].out is not None and ref[layer].inp is not None
        assert ref[layer].weight is not None


def _channel_masks(m: nn.Module):
    """{key: [list of (param, index) per channel]} built by explicit loops (brute force)."""
    w = m.weight
    if isinstance(m, nn.Embedding):
        V, D = w.shape
        return {"out": [[("weight", (slice(None), d))] for d in range(D)],
                "in": [[("weight", (v,))] for v in range(V)]}
    c_in, cog = w.shape[0], w.shape[1]
    g = m.groups
    cig = c_in // g
    out = []
    for gi in range(g):
        for j in range(cog):
            o = gi * cog + j
            parts = [("weight", (slice(gi * cig, (gi + 1) * cig), j))]
            if m.bias is not None:
                parts.append(("bias", (o,)))
            out.append(parts)
    return {"out": out, "in": [[("weight", (i,))] for i in range(c_in)]}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ["exact", "taylor"])
def test_reference_matches_brute_force(name, kind):
    m, b = _model(name), _batches(name, n=1)
    x, y = b[0]
    layers = oba_ext.find_layers(m)
    names = [f"{l}.{p}" for l, s in layers.items() for p in s.params]
    params = dict(m.named_parameters())
    theta = torch.cat([params[n].detach().reshape(-1) for n in names])
    sizes = [params[n].numel() for n in names]

    def loss(flat):
        vals = dict(zip(names, [t.view_as(params[n]) for t, n in zip(flat.split(sizes), names)]))
        return F.cross_entropy(torch.func.functional_call(m, vals, (x,)), y)

    direction = theta.clone()
    if name == "emb_pad":  # δθ = 0 on the padding row (it never moves: no gradient)
        direction[:m.emb.weight.shape[1]] = 0
        assert names[0] == "emb.weight"
    if kind == "exact":
        H = torch.autograd.functional.hessian(loss, theta)
        per = theta * (H @ direction)
    else:
        per = theta * torch.autograd.functional.jacobian(loss, theta)
    per = dict(zip(names, [t.view_as(params[n]) for t, n in zip(per.split(sizes), names)]))
    res = oba_ext.score(m, b, kind=kind, granularity=("out", "in", "weight"), impl="reference",
                        progress=False)
    for layer in NEW[name]:
        mod = dict(m.named_modules())[layer]
        for key, chans in _channel_masks(mod).items():
            want = torch.stack([sum(per[f"{layer}.{p}"][ix].sum() for p, ix in parts)
                                for parts in chans])
            got = res[layer].out if key == "out" else res[layer].inp
            assert_close_rel(got, want, f"{name} {kind} {layer}.{key}")
        assert_close_rel(res[layer].weight, per[f"{layer}.weight"], f"{name} {kind} {layer}.weight")
    if name == "emb_pad":  # the padding row gets no gradient: its scores are exactly zero
        assert res["emb"].inp[0] == 0 and bool((res["emb"].weight[0] == 0).all())


def test_kinds_are_registered_once_with_their_modules():
    assert kind_of(nn.ConvTranspose2d(2, 2, 1)).name == "conv_transpose"
    assert kind_of(nn.ConvTranspose1d(2, 2, 1)).name == "conv_transpose"
    assert kind_of(nn.Embedding(3, 2)).name == "embedding"
    assert KINDS["embedding"].params == ("weight",)
    m = _model("emb")
    assert channels_per_layer(m)["emb"] == 5
    assert channels_per_layer(_model("convt1d"))["up2"] == 4


def test_embedding_max_norm_refused_by_name():
    m = _model("emb")
    m.emb.max_norm = 1.0
    with pytest.raises(RuntimeError, match="max_norm"):
        oba_ext.score(m, _batches("emb"), impl="kernel", progress=False)
    # the reference path used to score it and renormalize the user's weight in place
    w0 = m.emb.weight.detach().clone()
    for impl in ("reference", "auto"):
        with pytest.raises(ValueError, match=r"module 'emb' \(Embedding, max_norm=1.0\) "
                                             r"renormalizes its weight in place"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # auto: the engine's fallback warning first
                oba_ext.score(m, _batches("emb"), impl=impl, progress=False)
    assert torch.equal(m.emb.weight.detach(), w0)


class ConvTOutputSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose1d(2, 3, 3, stride=2)
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.up(x, output_size=[12])).mean(2))


def test_conv_transpose_output_size_refused_then_reference():
    torch.manual_seed(0)
    m = ConvTOutputSize()
    b = [(torch.randn(4, 2, 5), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(RuntimeError, match="output_size"):
        oba_ext.score(m, b, impl="kernel", progress=False)
    with pytest.warns(UserWarning, match="output_size"):
        res = oba_ext.score(m, b, impl="auto", kind="exact", progress=False)
    assert res.impl == "reference" and res["up"].out.shape == (3,)


def test_torch_pruning_groups_of_new_kinds_get_importance():
    tp = pytest.importorskip("torch_pruning")
    from oba_ext.pruning import OBAImportance

    torch.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(3, 6, 3, stride=2, padding=1), nn.Tanh(),
                          nn.ConvTranspose2d(6, 4, 3), nn.Flatten(), nn.Linear(4 * 9 * 9, 3)).eval()
    b = [(torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 2, 0]))]
    imp = OBAImportance(kind="exact", batches=b, normalizer=None, eval_mode=None,
                        impl="reference", progress=False)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=b[0][0])
    group = dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=list(range(6)))
    got = imp(group)
    res = imp.last_result
    want = (res["0"].out.abs().float() + res["2"].inp.abs().float()) / 2
    torch.testing.assert_close(got, want, rtol=FLOAT32_SAME_FORMULA_RTOL, atol=0)
    assert got.ne(0).all()

    torch.manual_seed(0)
    lm = Emb().eval()
    tb = _batches("emb")
    imp = OBAImportance(kind="exact", batches=tb, normalizer=None, eval_mode=None,
                        impl="reference", progress=False)
    dg = tp.DependencyGraph().build_dependency(lm, example_inputs=tb[0][0])
    group = dg.get_pruning_group(lm.emb, tp.prune_embedding_out_channels, idxs=list(range(5)))
    got = imp(group)
    res = imp.last_result
    want = (res["emb"].out.abs().float() + res["fc1"].inp.abs().float()) / 2
    torch.testing.assert_close(got, want, rtol=FLOAT32_SAME_FORMULA_RTOL, atol=0)


def _direction(m, seed=5):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g, dtype=p.dtype)
            for n, p in m.named_parameters()}


@pytest.mark.parametrize("name", ["convt1d", "convt2d"])
@pytest.mark.parametrize("kind", ["exact", "oba", "ggn"])
def test_conv_transpose_curvature_products_engine_vs_reference(name, kind):
    m, b = _model(name), _batches(name)
    v = _direction(m)
    ref = oba_ext.hvp(m, b, v, kind=kind, impl="reference")
    eng = oba_ext.hvp(m, b, v, kind=kind, impl="kernel")
    for n in ref:
        if not ref[n].abs().max() > 0:  # e.g. Ĥv of the last bias (C = 0 after the loss)
            assert not eng[n].abs().max() > 0, f"{name} {kind} (Mv)[{n}]"
            continue
        assert_close_rel(eng[n], ref[n], f"{name} {kind} (Mv)[{n}]")
    if kind == "ggn":
        return
    kw = dict(kind=kind, granularity=("out", "in", "weight"), direction=v, progress=False)
    r = oba_ext.score(m, b, impl="reference", **kw)
    e = oba_ext.score(m, b, impl="kernel", **kw)
    for layer in NEW[name]:
        for key, t in r[layer].tensors().items():
            assert_close_rel(e[layer].tensors()[key], t, f"{name} {kind} v {layer}.{key}")


def test_embedding_directions_on_the_engine_with_the_padding_row_frozen():
    m, b = _model("emb_pad"), _batches("emb_pad")
    v = _direction(m)
    v0 = dict(v)
    v0["emb.weight"] = v["emb.weight"].clone()
    v0["emb.weight"][0] = 0
    for kind in ("exact", "oba", "ggn"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the engine runs it: no fallback warning
            got = oba_ext.hvp(m, b, v, kind=kind, impl="kernel")
        want = oba_ext.hvp(m, b, v0, kind=kind, impl="reference")
        for n in want:  # the padding row is a constant: moving it along v changes nothing
            torch.testing.assert_close(got[n], want[n], rtol=FLOAT64_SAME_FORMULA_RTOL, atol=0)
        assert bool((got["emb.weight"][0] == 0).all())
