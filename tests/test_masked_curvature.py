"""Curvature products on torch.nn.utils.prune-masked models (SPEC §8: θ = orig ⊙ mask; a masked
entry is not a parameter that moves). ``hvp``, ``score(direction=)`` and ``hessian_trace`` apply
a direction as ``v ⊙ mask`` and report ``(M (v ⊙ mask)) ⊙ mask``, on the engine and the
reference path alike. Found by a fresh-user probe: the engine ignored the masks (plain ``Hv``)
and the reference path returned zeros for the masked weight."""
from __future__ import annotations

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn

import brute
import oba_ext
from test_hvp import _brute_product
from tolerances import assert_close_rel


def _pruned():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    prune.random_unstructured(m[0], "weight", 0.5)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 3, generator=g, dtype=torch.float64),
             torch.randint(0, 2, (5,), generator=g))]
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64)
         for n, p in (("0.weight", m[0].weight), ("0.bias", m[0].bias), ("2.weight", m[2].weight),
                      ("2.bias", m[2].bias))}
    return m, data, v


def _truth(m, data, v, kind):
    """(M (v ⊙ mask)) ⊙ mask by torch.func on a plain copy holding the effective weight."""
    (x, y), = data
    mask = m[0].weight_mask
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    plain.load_state_dict({"0.weight": m[0].weight.detach(), "0.bias": m[0].bias.detach(),
                           "2.weight": m[2].weight.detach(), "2.bias": m[2].bias.detach()})
    vm = dict(v, **{"0.weight": v["0.weight"] * mask})
    out = _brute_product(plain, x, y, vm, kind, brute.flat(brute.target_params(plain))[2])
    out["0.weight"] = out["0.weight"] * mask
    return out


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("kind", ["exact", "ggn"])
def test_hvp_moves_only_unmasked_entries(kind, impl):
    m, data, v = _pruned()
    got = oba_ext.hvp(m, data, v, kind=kind, impl=impl)
    want = _truth(m, data, v, kind)
    for n in want:
        assert_close_rel(got[n], want[n], f"{kind} {impl} {n}")
    assert not got["0.weight"][m[0].weight_mask == 0].any()


def test_oba_hvp_and_directional_scores_agree_across_paths():
    m, data, v = _pruned()
    mask = m[0].weight_mask
    k = oba_ext.hvp(m, data, v, kind="oba", impl="kernel")
    r = oba_ext.hvp(m, data, v, kind="oba", impl="reference")
    for n in r:
        if n == "2.bias":  # Ĥ has no loss curvature: zero by structure on both paths
            assert not k[n].any() and not r[n].any()
            continue
        assert_close_rel(k[n], r[n], f"oba {n}")
    want = _truth(m, data, v, "exact")
    for impl in ("kernel", "reference"):
        s = oba_ext.score(m, data, kind="exact", direction=v, granularity=("weight", "out"),
                          impl=impl, progress=False)
        assert_close_rel(s["0"].weight, v["0.weight"] * mask * want["0.weight"],
                         f"{impl} v⊙Hv")
        assert not s["0"].weight[mask == 0].any()


def test_hessian_trace_ignores_masked_entries():
    """Hutchinson's z is masked too: the per-weight trace estimate is 0 at masked entries, and
    the two paths agree sample for sample (same seed)."""
    m, data, _ = _pruned()
    mask = m[0].weight_mask
    kw = dict(kind="hessian_trace", granularity=("weight", "out"), progress=False,
              criterion_options={"num_samples": 4, "seed": 3})
    k = oba_ext.score(m, data, impl="kernel", **kw)
    r = oba_ext.score(m, data, impl="reference", **kw)
    assert not k["0"].weight[mask == 0].any()
    for layer in ("0", "2"):
        for key, t in r[layer].tensors().items():
            assert_close_rel(k[layer].tensors()[key], t, f"hessian_trace {layer}.{key}")
