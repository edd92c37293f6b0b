"""The fused pointwise paths of the engine (GELU/SiLU through ATen's own backward ops, LayerNorm
through ATen's affine layer norm and its γ-weighted input gradient) against the reference
oracles in float64, for every LayerNorm affine variant and both GELU approximations, in all
quantities and keys, with any direction (``hvp``), and in float32 by the SPEC §7 rule."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from test_engine import compare, assert_float32_rule
from tolerances import assert_close_rel

D = torch.float64


class Block(nn.Module):
    """A transformer-MLP-like block: LayerNorm (``affine``: "both", "weight" (bias=False),
    "none") → Linear → activation → inactive Dropout → Linear, a second reader of the
    activation (fc3: each reader recomputes its own input pair), and a 2-D LayerNorm over
    (T, C)."""

    def __init__(self, act, affine, c=6, t=3):
        super().__init__()
        kw = {"none": dict(elementwise_affine=False), "weight": dict(bias=False),
              "both": {}}[affine]
        self.ln = nn.LayerNorm(c, **kw)
        self.ln2 = nn.LayerNorm((t, c), **kw)
        self.fc1, self.fc2, self.fc3 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c), nn.Linear(2 * c, c)
        self.act, self.drop = act, nn.Dropout(0.0)
        self.head = nn.Linear(t * c, 4)
        if affine != "none":  # not the identity initialisation: γ and β matter
            with torch.no_grad():
                for ln in (self.ln, self.ln2):
                    ln.weight.uniform_(0.5, 1.5)
                    if ln.bias is not None:
                        ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x):                                  # x: (B, T, C)
        a = self.act(self.fc1(self.ln(x)))
        h = x + self.fc2(self.drop(a)) - 0.5 * self.fc3(a)
        return self.head(self.ln2(h).flatten(1))


ACTS = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "silu": nn.SiLU(),
        "F.gelu_tanh": lambda a: F.gelu(a, approximate="tanh"), "F.silu": F.silu}


def _xy(n=4, t=3, c=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, c, generator=g, dtype=D), torch.randint(0, 4, (n,), generator=g)


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("act", list(ACTS))
def test_fused_pointwise_matches_oracles(act, affine):
    torch.manual_seed(0)
    compare(Block(ACTS[act], affine).double(), *_xy())


@pytest.mark.parametrize("kind", ["exact", "oba", "ggn"])
def test_fused_pointwise_hvp_matches_reference(kind):
    torch.manual_seed(1)
    m = Block(nn.GELU(), "both").double().eval()
    x, y = _xy(seed=1)
    g = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, generator=g, dtype=D) for n, p in m.named_parameters()
         if n.startswith(("fc", "head"))}
    data = [(x, y)]
    eng = oba_ext.hvp(m, data, v, kind=kind, impl="kernel", progress=False)
    ref = oba_ext.hvp(m, data, v, kind=kind, impl="reference", progress=False)
    assert set(eng) == set(ref)
    nonzero = 0
    for n in ref:
        if not ref[n].any():  # e.g. Ĥ's head.bias row: no product reaches it (SPEC §2)
            assert not eng[n].any(), f"hvp[{kind}] {n}: the reference is 0, the engine is not"
            continue
        assert_close_rel(eng[n], ref[n], what=f"hvp[{kind}] {n}")
        nonzero += 1
    assert nonzero >= 4


def test_fused_pointwise_float32_rule():
    torch.manual_seed(3)
    assert_float32_rule(Block(nn.GELU(), "both").double().eval(), *_xy(n=8, seed=3), "fused block")


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_linear_after_gelu_keeps_a_recipe_not_its_input_pair(act):
    """The memory saving is real: after the forward, the Linear reading the activation (through
    inactive dropout) holds no input pair, only the recipe that recomputes it bitwise."""
    from oba_ext.engine import build_scorer
    from oba_ext.scoring import checked_loss, default_loss
    from oba_ext.targets import find_layers
    torch.manual_seed(4)
    m = Block(ACTS[act], "both").double().eval()
    x, y = _xy(seed=4)
    sc = build_scorer(m, find_layers(m), checked_loss(default_loss), (x, y))
    with torch.no_grad():
        _, _, ctxs = sc._forward(x, ("out", "in", "weight"), True, False,
                                 lambda layer: (lambda *a: None))
    by_layer = {c.layer: c for c in ctxs.values() if getattr(c, "layer", None)}
    for name in ("fc2", "fc3"):
        c = by_layer[name]
        assert c.x is None and c.t is None and c.recipe is not None, name
        xr, tr = c.recipe()
        a = m.act(m.fc1(m.ln(x)))
        assert torch.equal(xr, a.detach())
    assert by_layer["fc1"].recipe is None  # its input (LayerNorm) offers none
    # only a rule that uses a recipe keeps it: no ctx holds its inputs' recipes
    assert all(c.input_recipes is None for c in ctxs.values() if hasattr(c, "input_recipes"))


class ConvBnSilu(nn.Module):
    """conv → conv → eval BN → SiLU → conv: the BN output is half of a two-stream buffer that
    nothing else keeps, so keeping x would cost twice σ' (the fused path must not be taken)."""

    def __init__(self):
        super().__init__()
        self.c0, self.c1 = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 4, 3)
        self.bn, self.c2 = nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.c2(self.act(self.bn(self.c1(self.c0(x))))).mean((2, 3))


def _activation_ctxs(m, x, y, keys):
    from oba_ext.engine import build_scorer
    from oba_ext.scoring import checked_loss, default_loss
    from oba_ext.targets import find_layers
    sc = build_scorer(m, find_layers(m), checked_loss(default_loss), (x, y))
    with torch.no_grad():
        _, _, ctxs = sc._forward(x, keys, True, False, lambda layer: (lambda *a: None))
    return sc, [c for c in ctxs.values() if hasattr(c, "bw")], ctxs


@pytest.mark.parametrize("keys", [("out",), ("out", "in"), ("weight",)])
def test_fused_activation_only_where_keeping_x_is_free(keys):
    torch.manual_seed(5)
    m = ConvBnSilu().double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=D)
    _, acts, _ = _activation_ctxs(m, x, torch.zeros(2, dtype=torch.long), keys)
    assert len(acts) == 1 and acts[0].bw is None and acts[0].d1 is not None  # σ' kept, not x
    # a Linear first, so that the block's fc1 runs on two streams and its output is half of a
    # [Y; T_Y] buffer: kept anyway with out scores (fused path), else σ' is kept
    mv = nn.Sequential(nn.Linear(6, 6), Block(nn.GELU(), "both")).double().eval()
    xv, yv = _xy(seed=5)
    _, acts, _ = _activation_ctxs(mv, xv, yv, keys)
    assert len(acts) == 1 and (acts[0].bw is not None) == ("out" in keys)
    # without the Linear, fc1's output owns its storage (T_Y = Y, no tangent before it):
    # keeping x costs what σ' would, so the fused path is taken for every key set
    _, acts, _ = _activation_ctxs(Block(nn.GELU(), "both").double().eval(), xv, yv, keys)
    assert len(acts) == 1 and acts[0].bw is not None


def test_recomputed_input_pair_is_not_kept_between_passes():
    """oba and exact in one call: each backward pass recomputes the reader's input pair and
    lets it go, instead of keeping one copy per reader for the later passes."""
    torch.manual_seed(6)
    m = Block(nn.GELU(), "both").double().eval()
    x, y = _xy(seed=6)
    sc, _, ctxs = _activation_ctxs(m, x, y, ("out", "in"))
    fc2 = next(c for c in ctxs.values() if getattr(c, "layer", None) == "fc2")
    loss_g = torch.ones(x.shape[0], 4, dtype=D)
    with torch.no_grad():
        sc._backward(ctxs, loss_g, torch.zeros_like(loss_g), "oba", True, last=False)
    assert fc2.x is None and fc2.t is None and fc2.recipe is not None
    eng = compare(m, x, y)[0]  # and the two-pass engine call still equals the oracles
    assert set(eng["fc2"]) == {"taylor", "oba", "exact"}
