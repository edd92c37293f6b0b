"""Real timm models (skipped when timm is not installed; `make test` installs it): the engine
against the reference oracles in float64 (SPEC §7, ≤ 1e-10 relative), head scores of timm's
Attention, model lookup by name, and FLOPs-target pruning of a timm model."""
from __future__ import annotations

import warnings

import pytest
import torch

import oba_ext

timm = pytest.importorskip("timm")

from tolerances import assert_f64

MODELS = {
    "vit_tiny": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    "deit_tiny": ("deit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2)),
    "resnet18": ("resnet18", {}),
    "efficientnet_b0": ("efficientnet_b0", {}),  # BatchNormAct2d: a functional F.batch_norm
}


def _model(key):
    name, kw = MODELS[key]
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=5, **kw).double().eval()


def _batches(n=2):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64),
             torch.randint(0, 5, (2,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("kind", ["oba", "exact", "taylor", "jacobian"])
def test_engine_matches_reference(key, kind):
    """jacobian also scores norm channels: timm's BatchNormAct2d is traced through and reaches
    the engine's F.batch_norm rule (it used to be zero-filled silently)."""
    model, data = _model(key), _batches()
    gran = ("out", "in", "weight")
    if kind == "jacobian":
        gran = ("out", "in")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no generic-rule fallback, no reference fallback
        eng = oba_ext.score(model, data, kind=kind, granularity=gran, impl="kernel", progress=False)
    ref = oba_ext.score(model, data, kind=kind, granularity=gran, impl="reference", progress=False)
    assert eng.impl == "kernel" and set(eng) == set(ref)
    for name in ref:
        for field, r in ref[name].tensors().items():  # eval mode: nothing analytically zero
            assert_f64(eng[name].tensors()[field], r, f"{key} {kind} {name}.{field}")


@pytest.mark.parametrize("kind", ["oba", "exact"])
def test_vit_head_scores(kind):
    model, data = _model("vit_tiny"), _batches(1)
    eng = oba_ext.score(model, data, kind=kind, granularity=("head", "out", "in"), impl="kernel",
                        progress=False)
    ref = oba_ext.score(model, data, kind=kind, granularity=("head", "out", "in"),
                        impl="reference", progress=False)
    H = model.blocks[0].attn.num_heads
    for b in range(len(model.blocks)):
        name = f"blocks.{b}.attn"
        assert eng[name].head.shape == (H,)
        assert_f64(eng[name].head, ref[name].head, f"{name}.head")
        # by hand: the head's q/k/v output channels plus the proj's input channels
        qkv, proj = ref[f"{name}.qkv"].out, ref[f"{name}.proj"].inp
        want = qkv.reshape(3, H, -1).sum((0, 2)) + proj.reshape(H, -1).sum(1)
        assert_f64(eng[name].head, want, f"{name}.head by hand")


def test_cli_model_lookup_and_flops_pruning():
    from oba_ext.models import get_model
    from oba_ext.pruning import OBAImportance, prune_to_target

    model = get_model("timm:resnet18", num_classes=5).eval()
    data = [(x.float(), y) for x, y in _batches(1)]
    imp = OBAImportance(kind="oba", batches=data)
    out = prune_to_target(model, data[0][0], imp, flops_ratio=0.5, progress=False)
    assert abs(out.macs_after / out.macs_before - 0.5) <= 0.03 * 0.5
    assert out.model(data[0][0]).shape == (2, 5)
