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


class WeightsFeedLoss(nn.Module):
    """Train-mode dropout, then MHA whose attention weights feed the loss: the engine refuses
    only at run time, after drawing the batch's dropout mask."""

    def __init__(self):
        super().__init__()
        self.i, self.d = nn.Linear(8, 8), nn.Dropout(0.4)
        self.m, self.o = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        h = self.d(torch.tanh(self.i(x)))
        y, w = self.m(h, h, h)
        return self.o(y.mean(1)) + w.mean((1, 2))[:, None]


def _seq_batches(n=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(3, 5, 8, generator=g, dtype=D), torch.randint(0, 3, (3,), generator=g))
            for _ in range(n)]


def test_fallback_mid_run_redraws_the_same_masks():
    torch.manual_seed(0)
    m = WeightsFeedLoss().double().train()
    batches = _seq_batches()
    out = {}
    for impl in ("auto", "reference"):
        torch.manual_seed(7)
        r = _score(m, batches, kind="exact", impl=impl)
        out[impl] = (r["i"].out, torch.rand(1))
    assert torch.equal(out["auto"][0], out["reference"][0])
    assert torch.equal(out["auto"][1], out["reference"][1])  # the RNG advanced once, not twice


def test_hvp_and_operator_fall_back_at_run_time_like_score():
    torch.manual_seed(0)
    m = WeightsFeedLoss().double().eval()
    batches = _seq_batches(1)
    g = torch.Generator().manual_seed(3)
    v = {n: torch.randn(p.shape, generator=g, dtype=D) for n, p in m.named_parameters()}
    want = oba_ext.hvp(m, batches, v, impl="reference")
    with pytest.warns(UserWarning, match="falling back to the reference path"):
        got = oba_ext.hvp(m, batches, v, impl="auto")
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)
    with pytest.raises(RuntimeError, match="impl='kernel'"):
        oba_ext.hvp(m, batches, v, impl="kernel")
    op = oba_ext.curvature_operator(m, batches)
    x = torch.randn(op.shape[0], generator=g, dtype=D)
    with pytest.warns(UserWarning, match="falling back"):
        y = op @ x
    assert torch.isfinite(y).all() and y.shape == x.shape


def test_operator_products_share_the_masks_of_a_train_mode_model():
    """The same product twice is bitwise the same, and M is symmetric (zᵀMx = xᵀMz), with
    dropout active; the caller's random state is put back after each product."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    m.train()
    batches = _batches(2)
    for rc in (False, True):
        op = oba_ext.curvature_operator(m, batches, impl="kernel", recompute=rc)
        g = torch.Generator().manual_seed(4)
        x, z = (torch.randn(op.shape[0], generator=g, dtype=D) for _ in range(2))
        torch.manual_seed(11)
        mx = op @ x
        after = torch.rand(1)
        torch.manual_seed(11)
        assert torch.equal(op @ x, mx) and torch.equal(torch.rand(1), after)
        mz = op @ z
        assert abs(torch.dot(z, mx) - torch.dot(x, mz)) <= 1e-12 * mx.norm() * z.norm()


def test_checkpoint_resume_of_a_train_mode_model_is_identical(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    m.train()
    batches = _batches(4)
    torch.manual_seed(3)
    full = _score(m, batches, kind="oba", impl="kernel")
    ck = str(tmp_path / "ck.pt")
    torch.manual_seed(3)
    _score(m, batches[:2], kind="oba", impl="kernel", checkpoint=ck, checkpoint_every=1)
    torch.manual_seed(99)  # whatever ran in between
    resumed = _score(m, batches, kind="oba", impl="kernel", checkpoint=ck, checkpoint_every=1)
    for n in ("0", "3"):
        assert torch.equal(resumed[n].out, full[n].out), n


@pytest.mark.parametrize("bad", ["no", 2, None])
def test_recompute_must_be_a_bool(bad):
    m = nn.Sequential(nn.Linear(6, 3)).double()
    with pytest.raises(TypeError, match="recompute"):
        oba_ext.score(m, _batches(1), recompute=bad, progress=False)
    with pytest.raises(TypeError, match="recompute"):
        oba_ext.hvp(m, _batches(1), {}, recompute=bad)


def test_masked_model_falling_back_mid_run_keeps_its_masks_along_a_direction():
    import torch.nn.utils.prune as prune
    torch.manual_seed(0)
    m = WeightsFeedLoss().double().eval()
    prune.l1_unstructured(m.i, "weight", amount=0.5)
    prune.l1_unstructured(m.o, "weight", amount=0.5)
    batches = _seq_batches(2)
    g = torch.Generator().manual_seed(3)
    direction = {n.replace("_orig", ""): torch.randn(p.shape, generator=g, dtype=D)
                 for n, p in m.named_parameters()}
    res = {impl: _score(m, batches, kind="exact", direction=direction, impl=impl)
           for impl in ("reference", "auto")}
    for n in ("i", "o"):
        assert_close_rel(res["auto"][n].out, res["reference"][n].out, f"{n}.out")


class DrawThenUntraceable(nn.Module):
    """Python's random, then a data-dependent branch fx cannot trace: capture fails after the
    draw."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if random.random() < 0.5:
            h = h + torch.tanh(self.b(h))
        if h.sum() > 0:
            h = h * 2
        return self.c(h)


def test_a_failed_trace_puts_the_random_state_back():
    torch.manual_seed(0)
    m = DrawThenUntraceable().double().train()
    batches = _batches(4)
    random.seed(0)
    s0 = random.getstate()
    with pytest.raises(CaptureError):
        build_scorer(m, find_layers(m), checked_loss(default_loss), batches[0])
    assert random.getstate() == s0
    res, nxt = {}, {}
    for impl in ("auto", "reference"):
        random.seed(0)
        res[impl] = _score(m, batches, kind="exact", impl=impl)
        nxt[impl] = random.random()
    assert nxt["auto"] == nxt["reference"]
    for n in ("a", "b", "c"):
        assert torch.equal(res["auto"][n].out, res["reference"][n].out), n


class NumpyScale(nn.Module):
    """One NumPy draw per forward, logged."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.log = []

    def forward(self, x):
        s = float(np.random.uniform(0.5, 1.5))
        if not isinstance(x, torch.fx.Proxy):
            self.log.append((float(x.detach().sum()), s))
        h = torch.tanh(self.a(x)) * s
        return self.c(torch.tanh(self.b(h)) * h)


def test_python_and_numpy_draws_are_replayed_by_the_oracles_operator_and_resume(tmp_path):
    """The reference oba oracle's passes of a batch all see the batch's one NumPy draw, and the
    draws follow NumPy's sequence (one per batch); operator products of a model drawing from
    Python's random are one fixed symmetric matrix; a resumed run draws what the uninterrupted
    one drew."""
    torch.manual_seed(0)
    m = NumpyScale().double().train()
    batches = _batches(3)
    np.random.seed(0)
    _score(m, batches, kind="oba", impl="reference")
    np.random.seed(0)
    want = [float(np.random.uniform(0.5, 1.5)) for _ in batches]
    per_batch = {}
    for k, s in m.log:
        per_batch.setdefault(k, set()).add(s)
    assert all(len(v) == 1 for v in per_batch.values()) and len(per_batch) == len(batches)
    assert sorted(v.pop() for v in per_batch.values()) == sorted(want)

    op = oba_ext.curvature_operator(FrozenDraw("python").double().train(), batches)
    g = torch.Generator().manual_seed(4)
    x, z = (torch.randn(op.shape[0], generator=g, dtype=D) for _ in range(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mx = op @ x
        assert torch.equal(op @ x, mx)
        mz = op @ z
    assert abs(torch.dot(z, mx) - torch.dot(x, mz)) <= 1e-12 * mx.norm() * z.norm()

    ck = str(tmp_path / "np.pt")
    np.random.seed(1)
    full = _score(m, batches, kind="exact", impl="reference")
    np.random.seed(1)
    _score(m, batches[:2], kind="exact", impl="reference", checkpoint=ck, checkpoint_every=1)
    np.random.seed(99)
    resumed = _score(m, batches, kind="exact", impl="reference", checkpoint=ck,
                     checkpoint_every=1)
    for n in ("a", "b", "c"):
        assert torch.equal(resumed[n].out, full[n].out), n
