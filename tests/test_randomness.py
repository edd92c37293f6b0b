"""Randomness inside a model's forward, on every path (found by a fresh-user probe):

- a forward drawing from its own ``torch.Generator``: the engine with ``recompute=True`` replays
  it in recomputed segments (bitwise the ordinary sweep, the generator left where a forward
  leaves it), and the reference ``oba`` oracle replays it in each of its passes;
- randomness the engine's capture would freeze into the program (Python's ``random``, NumPy,
  ``torch.randperm(8)`` with constant arguments): capture refuses, ``impl="auto"`` falls back
  to the reference path, and every generator is left as the reference path leaves it."""
from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import oba_ext
from oba_ext.engine import CaptureError, build_scorer
from oba_ext.scoring import checked_loss, default_loss
from oba_ext.targets import find_layers
from tolerances import assert_close_rel

D = torch.float64


class OwnGenerator(nn.Module):
    """A mask drawn from the module's own generator (a fixed-seed dropout), or ``fixed``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.gen = torch.Generator().manual_seed(123)
        self.fixed = None

    def forward(self, x):
        h = torch.tanh(self.a(x))
        mask = (self.fixed if self.fixed is not None else
                (torch.rand(h.shape, generator=self.gen, dtype=h.dtype) > 0.5).to(h.dtype))
        return self.c(torch.tanh(self.b(h * mask)) * h)


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 6, generator=g, dtype=D), torch.randint(0, 3, (4,), generator=g))
            for _ in range(n)]


def _score(m, batches, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return oba_ext.score(m, batches, progress=False, **kw)


@pytest.mark.parametrize("kind", ["oba", "exact"])
def test_own_generator_with_fixed_masks_on_every_path(kind):
    """Each path equals the model with the masks a plain forward draws, fed as constants; the
    generator ends where plain forwards leave it."""
    torch.manual_seed(0)
    m = OwnGenerator().double().train()
    batches = _batches()
    m.gen.manual_seed(123)
    masks = [(torch.rand((4, 8), generator=m.gen, dtype=D) > 0.5).to(D) for _ in batches]
    after = torch.rand(1, generator=m.gen)
    want = {}
    for mask, b in zip(masks, batches):
        m.fixed = mask
        r = _score(m, [b], kind=kind, impl="reference")
        for n in ("a", "b", "c"):
            want[n] = want.get(n, 0) + r[n].out / len(batches)
    m.fixed = None
    # oba: the engine refuses torch.rand (not known to be product-free), so "auto" falls back
    eng = "kernel" if kind == "exact" else "auto"
    for impl, rc in (("reference", False), (eng, False), (eng, True)):
        m.gen.manual_seed(123)
        r = _score(m, batches, kind=kind, impl=impl, recompute=rc)
        for n in ("a", "b", "c"):
            assert_close_rel(r[n].out, want[n], f"{impl} recompute={rc} {kind} {n}.out")
        assert torch.equal(torch.rand(1, generator=m.gen), after), (impl, rc)


def test_recompute_replays_own_generator_bitwise():
    torch.manual_seed(0)
    m = OwnGenerator().double().train()
    b = _batches(1)[0]
    sc = build_scorer(m, find_layers(m), checked_loss(default_loss), b)
    sc.recompute = True
    assert sc._segment_plan(), "the test needs a checkpointed segment"
    out = {}
    for rc in (False, True):
        sc.recompute = rc
        m.gen.manual_seed(5)
        out[rc] = sc(b[0], b[1], ("oba", "exact"), ("out", "in", "weight"))
        out[rc, "next"] = torch.rand(1, generator=m.gen)
    for layer, d in out[False].items():
        for q, dd in d.items():
            for k, v in dd.items():
                assert torch.equal(v, out[True][layer][q][k]), (layer, q, k)
    assert torch.equal(out[False, "next"], out[True, "next"])


class FrozenDraw(nn.Module):
    """Randomness fx would evaluate once while tracing: ``how`` in "python", "numpy",
    "randperm" (constant arguments)."""

    def __init__(self, how):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.how = how

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.how == "python" and random.random() < 0.5:  # LayerDrop-style
            h = h + torch.tanh(self.b(h)) * h
        if self.how == "numpy":
            h = h * float(np.random.uniform(0.5, 1.5))
        if self.how == "randperm":
            h = h[:, torch.randperm(8)] * h
        return self.c(torch.tanh(self.b(h)))


@pytest.mark.parametrize("how", ["python", "numpy", "randperm"])
def test_randomness_fx_would_freeze_is_refused_and_auto_falls_back(how):
    torch.manual_seed(0)
    m = FrozenDraw(how).double().train()
    batches = _batches(4)
    with pytest.raises(CaptureError, match="draws random numbers"):
        build_scorer(m, find_layers(m), checked_loss(default_loss), batches[0])
    res, states = {}, {}
    for impl in ("auto", "reference"):
        random.seed(0)
        np.random.seed(0)
        torch.manual_seed(7)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            res[impl] = oba_ext.score(m, batches, kind="exact", impl=impl, progress=False)
        states[impl] = (random.random(), float(np.random.uniform()), torch.rand(1).item())
        if impl == "auto":
            assert any("draws random numbers" in str(x.message) for x in w)
    assert res["auto"].impl == "reference"
    for n in ("a", "b", "c"):
        assert torch.equal(res["auto"][n].out, res["reference"][n].out), n
    assert states["auto"] == states["reference"]  # capture put every generator back
