"""``recompute=True`` (activation checkpointing of the engine's sweep, oba_ext/engine/sweep.py):
the scores and curvature products are bitwise those of the ordinary sweep (dropout masks
included), on random models of the whole op grammar and on transformers, and the forward keeps
less: fewer ctxs and a lower peak of allocated memory."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import oba_ext
from oba_ext.engine import build_scorer
from oba_ext.scoring import checked_loss, default_loss
from oba_ext.targets import find_layers
from random_models import generate

D = torch.float64
Q = ("taylor", "oba", "exact")
K = ("out", "in", "weight", "bias", "head")


def _vit(dropout=0.0, layers=3):
    from torchvision.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    return VisionTransformer(image_size=16, patch_size=4, num_layers=layers, num_heads=2,
                             hidden_dim=16, mlp_dim=32, num_classes=5, dropout=dropout).double()


def _encoder():
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True,
                                       activation="gelu", dtype=D)
    layer.self_attn.dropout = 0.0  # refused in train mode; the block's other dropouts stay on

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
            self.head = nn.Linear(8, 4, dtype=D)

        def forward(self, x):
            return self.head(self.enc(x).mean(1))
    return M()


def _same(a, b, what):
    n = 0
    for layer in a:
        for q in a[layer]:
            for k, v in a[layer][q].items():
                w = b[layer][q][k]
                assert torch.equal(v, w), f"{what}: {layer} {q} {k} differs by {(v - w).abs().max()}"
                n += 1
    assert n > 0
    return n


def _both(model, x, y, quantities=Q, keys=K, loss=None, **kw):
    sc = build_scorer(model, find_layers(model), checked_loss(loss or default_loss), (x, y))
    torch.manual_seed(7)
    plain = sc(x, y, quantities, keys, **kw)
    sc.recompute = True
    assert len(sc._segment_plan()) >= 2, "the model should have checkpointed segments"
    torch.manual_seed(7)
    again = sc(x, y, quantities, keys, **kw)
    assert sc._segments == {}  # released after the last pass
    return plain, again


@pytest.mark.parametrize("model", ["vit_dropout", "vit_eval", "encoder"])
def test_recompute_is_bitwise_the_ordinary_sweep(model):
    """Every quantity and key, oba and exact in one call (two backward passes over the same
    segments), dropout active in train mode (the masks are drawn again from the saved RNG)."""
    m = {"vit_dropout": lambda: _vit(0.2), "vit_eval": lambda: _vit().eval(),
         "encoder": _encoder}[model]()
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 3, 16, 16, generator=g, dtype=D) if model != "encoder"
         else torch.randn(3, 5, 8, generator=g, dtype=D))
    y = torch.randint(0, 4, (3,), generator=g)
    _same(*_both(m, x, y), model)


@pytest.mark.parametrize("seed", list(range(12)) + [21, 23, 26, 31, 37])
def test_recompute_on_random_models(seed):
    arch = generate(seed)
    model, x, y = arch.model, arch.inputs, arch.targets
    sc = build_scorer(model, find_layers(model), checked_loss(arch.loss), (x, y))
    torch.manual_seed(7)
    plain = sc(x, y, Q, K)
    sc.recompute = True
    torch.manual_seed(7)
    _same(plain, sc(x, y, Q, K), arch.describe())


@pytest.mark.parametrize("kind", ["exact", "oba", "ggn"])
def test_recompute_curvature_products_and_directions(kind):
    m = _vit().eval()
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 3, 16, 16, generator=g, dtype=D), torch.randint(0, 5, (2,), generator=g)
    v = {n: torch.randn(p.shape, generator=g, dtype=D) for n, p in m.named_parameters()
         if p.dim() >= 1 and ("mlp" in n or "head" in n or "in_proj" in n)}
    a = oba_ext.hvp(m, [(x, y)], v, kind=kind, impl="kernel")
    b = oba_ext.hvp(m, [(x, y)], v, kind=kind, impl="kernel", recompute=True)
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    if kind != "ggn":  # scores along the direction (v ⊙ Mv per channel)
        plain, again = _both(m, x, y, (kind,), ("out", "in"), direction=v)
        _same(plain, again, f"direction {kind}")


def test_recompute_keeps_less():
    """What the forward keeps: the ctxs of checkpointed segments are gone after it, and the
    peak of allocated memory of a whole scoring call drops (deterministic allocation sizes,
    not time)."""
    from benchmarks.harness import _cpu_peak_bytes
    m = _vit(layers=6).eval().float()
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 5, (16,), generator=g)
    sc = build_scorer(m, find_layers(m), checked_loss(default_loss), (x, y))
    keys = ("out", "in")
    with torch.no_grad():
        n_plain = len(sc._forward(x, keys, True, False, lambda layer: (lambda *a: None))[2])
        sc.recompute = True
        n_ck = len(sc._forward(x, keys, True, False, lambda layer: (lambda *a: None))[2])
        sc._segments = {}
    assert n_ck < n_plain / 2
    peaks = {}
    for rc in (False, True):
        sc.recompute = rc
        sc(x, y, ("oba",), keys)
        peaks[rc] = _cpu_peak_bytes(lambda: sc(x, y, ("oba",), keys))
    assert peaks[True] < 0.7 * peaks[False], peaks


def test_score_recompute_end_to_end_and_reference_warning():
    m = _vit().eval()
    g = torch.Generator().manual_seed(6)
    data = [(torch.randn(2, 3, 16, 16, generator=g, dtype=D), torch.randint(0, 5, (2,), generator=g))
            for _ in range(2)]
    a = oba_ext.score(m, data, kind="oba", impl="kernel", progress=False)
    b = oba_ext.score(m, data, kind="oba", impl="kernel", progress=False, recompute=True)
    for name in a:
        assert torch.equal(a[name].out, b[name].out) and torch.equal(a[name].inp, b[name].inp)
    with pytest.warns(UserWarning, match="recompute=True applies to the engine"):
        oba_ext.score(m, data, kind="oba", impl="reference", progress=False, recompute=True)
