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


def test_loss_reading_what_the_traced_dict_lacks_falls_back():
    """A ModelOutput field left None is absent from the traced dict: a loss reading it falls
    back to the reference path (auto, with a warning) and gets the reference's numbers."""
    mo = pytest.importorskip("transformers.modeling_outputs")

    class HF(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return mo.SequenceClassifierOutput(logits=self.head(torch.tanh(self.a(x))))

    def loss(o, y):
        extra = 0.0 if o.hidden_states is None else o.hidden_states[0].sum()
        return F.cross_entropy(o.logits, y) + extra
    torch.manual_seed(4)
    m = HF().double()
    data = [_xy(4)]
    with pytest.warns(UserWarning, match="hidden_states"):
        auto = oba_ext.score(m, data, loss_fn=loss, kind="exact", impl="auto", progress=False)
    ref = oba_ext.score(m, data, loss_fn=loss, kind="exact", impl="reference", progress=False)
    assert auto.impl == "reference"
    for n in ref:
        assert torch.equal(auto[n].out, ref[n].out), n
