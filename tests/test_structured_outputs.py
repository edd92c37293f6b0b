"""Models returning a tuple, list or dict run on the engine (they used to fall back to the
reference path): the loss sees the same structure, and every output leaf seeds the backward
sweep. Engine vs the reference oracles in float64, for every quantity and key, curvature
products of every kind, with recompute, and odd leaves (a value returned twice, the input
returned as is, a constant, an integer tensor)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from test_engine import compare
from tolerances import assert_close_rel

D = torch.float64


class Multi(nn.Module):
    """Returns ``how``: "tuple" (logits, aux, h), "dict" with a constant and an integer leaf,
    "list" with one value twice and the input as is."""

    def __init__(self, how):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 8)
        self.head, self.aux = nn.Linear(8, 3), nn.Linear(8, 3)
        self.how = how

    def forward(self, x):
        h = torch.tanh(self.a(x))
        g = torch.tanh(self.b(h)) * h
        logits, aux = self.head(g), self.aux(h)
        if self.how == "tuple":
            return logits, aux, h
        if self.how == "dict":
            return {"logits": logits, "aux": aux, "scale": 0.5, "argmax": logits.argmax(-1)}
        return [logits, aux, logits, x]


def _loss(how):
    if how == "tuple":
        return lambda out, y: F.cross_entropy(out[0], y) + 0.3 * F.cross_entropy(out[1], y) \
            + 0.1 * out[2].pow(2).mean()
    if how == "dict":
        return lambda out, y: F.cross_entropy(out["logits"], y) \
            + out["scale"] * F.cross_entropy(out["aux"], y)
    return lambda out, y: F.cross_entropy(out[0] + out[2], y) + (out[1] * out[3][:, :3]).mean()


def _xy(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, generator=g, dtype=D), torch.randint(0, 3, (5,), generator=g)


@pytest.mark.parametrize("how", ["tuple", "dict", "list"])
def test_structured_output_engine_matches_oracles(how):
    torch.manual_seed(0)
    m = Multi(how).double()
    compare(m, *_xy(), loss_fn=_loss(how))


@pytest.mark.parametrize("how", ["tuple", "dict", "list"])
def test_structured_output_runs_on_the_engine_with_hvp_and_recompute(how):
    torch.manual_seed(1)
    m = Multi(how).double()
    data = [_xy(1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning
        r = oba_ext.score(m, data, loss_fn=_loss(how), kind="exact", impl="auto", progress=False)
    assert r.impl == "kernel"
    g = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, generator=g, dtype=D) for n, p in m.named_parameters()}
    for kind in ("exact", "oba", "ggn"):
        want = oba_ext.hvp(m, data, v, kind=kind, loss_fn=_loss(how), impl="reference")
        for rc in (False, True):
            got = oba_ext.hvp(m, data, v, kind=kind, loss_fn=_loss(how), impl="kernel",
                              recompute=rc)
            for n in want:
                if want[n].any():
                    assert_close_rel(got[n], want[n], f"{how} hvp[{kind}] recompute={rc} {n}")
                else:
                    assert not got[n].any(), n
    a = oba_ext.score(m, data, loss_fn=_loss(how), kind="oba", impl="kernel", progress=False)
    b = oba_ext.score(m, data, loss_fn=_loss(how), kind="oba", impl="kernel", progress=False,
                      recompute=True)
    for n in a:
        assert torch.equal(a[n].out, b[n].out) and torch.equal(a[n].inp, b[n].inp)


def test_structured_output_without_a_computed_value_is_refused():
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)

        def forward(self, x):
            self.a(x)
            return (1.0, "text")
    from oba_ext.engine import CaptureError, build_scorer
    from oba_ext.scoring import checked_loss, default_loss
    from oba_ext.targets import find_layers
    m = Const().double()
    x = torch.randn(3, 2, dtype=D)
    with pytest.raises(CaptureError, match="holding no computed value"):
        build_scorer(m, find_layers(m), checked_loss(default_loss), (x, torch.zeros(3)))


@pytest.mark.parametrize("loss", ["default", "attr", "index", "key"])
def test_hf_model_output_keeps_its_access_on_the_engine(loss):
    """fx traces a ModelOutput as a plain dict; the loss still reads ``.logits``, ``[0]`` or
    ``["logits"]``, and the engine equals the reference path (which sees the real object)."""
    mo = pytest.importorskip("transformers.modeling_outputs")

    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return mo.SequenceClassifierOutput(logits=self.head(h), hidden_states=(h,))
    fn = {"default": None,
          "attr": lambda o, y: F.cross_entropy(o.logits, y) + o.hidden_states[0].square().mean(),
          "index": lambda o, y: F.cross_entropy(o[0], y),
          "key": lambda o, y: F.cross_entropy(o["logits"], y)}[loss]
    torch.manual_seed(3)
    m = HF().double()
    data = [_xy(3)]
    kw = dict(kind="exact", progress=False) | ({"loss_fn": fn} if fn else {})
    eng = oba_ext.score(m, data, impl="kernel", **kw)
    ref = oba_ext.score(m, data, impl="reference", **kw)
    for n in ref:
        assert_close_rel(eng[n].out, ref[n].out, f"{loss} {n}.out")


def test_model_output_is_the_real_class_on_the_engine():
    """fx traces a ModelOutput as a dict of its set fields; the engine hands the loss the real
    class (learned from one example call), so fields left None, isinstance, setting a field
    and integer keys of a plain dict behave as on the reference path."""
    mo = pytest.importorskip("transformers.modeling_outputs")
    from transformers.utils import ModelOutput

    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head, self.b = nn.Linear(6, 8), nn.Linear(8, 3), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return mo.SequenceClassifierOutput(logits=self.head(h), attentions=(self.b(h),))

    class IntKeys(HF):
        def forward(self, x):
            h = torch.tanh(self.a(x))
            return {1: self.head(h), 0: self.b(h)}

    def hf_loss(o, y):
        assert isinstance(o, ModelOutput)
        extra = 0.0 if o.hidden_states is None else o.hidden_states[0].sum()
        o.logits = o.logits / 0.5  # a ModelOutput updates its dict entry too
        return F.cross_entropy(o[0], y) + extra + 0.1 * o.attentions[0].square().mean()

    torch.manual_seed(4)
    data = [_xy(4)]
    for model, loss in ((HF(), hf_loss), (IntKeys(), lambda o, y: F.cross_entropy(o[0], y))):
        m = model.double()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            eng = oba_ext.score(m, data, loss_fn=loss, kind="exact", impl="auto", progress=False)
        ref = oba_ext.score(m, data, loss_fn=loss, kind="exact", impl="reference", progress=False)
        assert eng.impl == "kernel"
        for n in ref:
            if ref[n].out.any():
                assert_close_rel(eng[n].out, ref[n].out, f"{type(m).__name__} {n}.out")
            else:
                assert not eng[n].out.any(), n


def test_a_value_returned_twice_is_one_tensor_for_the_loss():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)

        def forward(self, x):
            z = self.a(x)
            return z, z

    def loss(o, y):
        return F.cross_entropy(o[0], y) * (2.0 if o[0] is o[1] else 1.0)
    torch.manual_seed(5)
    m = Twice().double()
    data = [_xy(5)]
    eng = oba_ext.score(m, data, loss_fn=loss, kind="exact", impl="kernel", progress=False)
    ref = oba_ext.score(m, data, loss_fn=loss, kind="exact", impl="reference", progress=False)
    assert_close_rel(eng["a"].out, ref["a"].out, "a.out")


def test_oba_refuses_a_loss_that_multiplies_outputs_and_auto_agrees_with_reference():
    """CLIP-style CE(o[0] @ o[1].T): SPEC §2 drops the loss's curvature, the reference oracle
    counts the product; the engine refuses oba (auto falls back), exact runs on the engine."""
    class Clip(nn.Module):
        def __init__(self):
            super().__init__()
            self.fi, self.ft = nn.Linear(5, 4), nn.Linear(6, 4)

        def forward(self, xi, xt):
            return self.fi(torch.tanh(xi)), self.ft(xt)
    torch.manual_seed(6)
    m = Clip().double()
    g = torch.Generator().manual_seed(6)
    data = [((torch.randn(8, 5, generator=g, dtype=D), torch.randn(8, 6, generator=g, dtype=D)),
             torch.arange(8))]

    def loss(o, y):
        return F.cross_entropy(o[0] @ o[1].T, y)
    with pytest.raises(RuntimeError, match="multiplies two values"):
        oba_ext.score(m, data, loss_fn=loss, kind="oba", impl="kernel", progress=False)
    with pytest.warns(UserWarning, match="multiplies two values"):
        auto = oba_ext.score(m, data, loss_fn=loss, kind="oba", impl="auto", progress=False)
    ref = oba_ext.score(m, data, loss_fn=loss, kind="oba", impl="reference", progress=False)
    assert auto.impl == "reference"
    for n in ref:
        assert torch.equal(auto[n].out, ref[n].out), n
    ex = oba_ext.score(m, data, loss_fn=loss, kind="exact", impl="kernel", progress=False)
    exr = oba_ext.score(m, data, loss_fn=loss, kind="exact", impl="reference", progress=False)
    for n in exr:
        assert_close_rel(ex[n].out, exr[n].out, f"exact {n}.out")


def test_in_place_loss_and_namedtuple_outputs():
    """A loss working on the output in place matches the reference; a namedtuple output (one
    fx call the engine cannot take apart) falls back under auto instead of failing."""
    import collections
    NT = collections.namedtuple("NT", "logits aux")

    class Two(nn.Module):
        def __init__(self, nt=False):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(6, 7), nn.Linear(7, 3), nn.Linear(7, 3)
            self.nt = nt

        def forward(self, x):
            h = torch.tanh(self.a(x))
            return NT(self.b(h), self.c(h)) if self.nt else (self.b(h), self.c(h))
    torch.manual_seed(7)
    data = [_xy(7)]
    m = Two().double()
    loss = lambda o, y: F.cross_entropy(o[0].add_(o[1]), y)  # noqa: E731
    for kind in ("oba", "exact"):
        eng = oba_ext.score(m, data, loss_fn=loss, kind=kind, impl="kernel", progress=False)
        ref = oba_ext.score(m, data, loss_fn=loss, kind=kind, impl="reference", progress=False)
        for n in ref:
            assert_close_rel(eng[n].out, ref[n].out, f"in place {kind} {n}.out")
    m = Two(nt=True).double()
    loss = lambda o, y: F.cross_entropy(o.logits + o.aux, y)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = oba_ext.score(m, data, loss_fn=loss, kind="exact", impl="auto", progress=False)
    ref = oba_ext.score(m, data, loss_fn=loss, kind="exact", impl="reference", progress=False)
    assert auto.impl == "reference"
    for n in ref:
        assert torch.equal(auto[n].out, ref[n].out), n
