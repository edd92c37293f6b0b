"""Optimal Brain Connection's Jacobian Criterion (SPEC §6) against a brute-force implementation
of its definition: per batch, the autograd gradient of that batch's loss, ``t_m = Σ_{i∈m} w_i g_i``
per component m (output filter + bias, input-channel slice, BN/LN channel γ_c + β_c), squared,
then averaged over batches. Tiny float64 models, tolerance ≤ 1e-10 relative (SPEC §7)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from tolerances import NOT_EQUAL_RTOL, assert_close_rel



class ConvBNLN(nn.Module):
    """conv → BN → ReLU → conv → flatten → Linear → LN → GELU → Linear; input (N, 2, 4, 4)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.c2 = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(16, 5)
        self.ln = nn.LayerNorm(5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x):
        h = self.c2(F.relu(self.bn(self.c1(x))))
        return self.fc2(F.gelu(self.ln(self.fc1(h.flatten(1)))))


DENSE = ("c1", "c2", "fc1", "fc2")
NORMS = ("bn", "ln")


def model():
    torch.manual_seed(0)
    m = ConvBNLN().double()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        for norm in (m.bn, m.ln):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.3, 0.3)
    return m.eval()


def batches(n=3, bs=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 2, 4, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (bs,), generator=g)) for _ in range(n)]


def components_of_batch(m, x, t):
    """{(layer, "out"|"in"): t_m for every component} for one batch, by autograd."""
    m.zero_grad()
    F.cross_entropy(m(x), t).backward()
    comp = {}
    for name in DENSE:
        mod = m.get_submodule(name)
        wg = mod.weight.detach() * mod.weight.grad
        comp[(name, "out")] = wg.reshape(wg.shape[0], -1).sum(1) + mod.bias.detach() * mod.bias.grad
        comp[(name, "in")] = wg.transpose(0, 1).reshape(wg.shape[1], -1).sum(1)
    for name in NORMS:
        mod = m.get_submodule(name)
        comp[(name, "out")] = (mod.weight.detach() * mod.weight.grad
                               + mod.bias.detach() * mod.bias.grad).reshape(-1)
    m.zero_grad()
    return comp


def brute_jacobian(m, bs):
    acc = {}
    for x, t in bs:
        for k, v in components_of_batch(m, x, t).items():
            acc[k] = acc.get(k, 0) + v ** 2
    return {k: v / len(bs) for k, v in acc.items()}


def test_jacobian_matches_definition_including_bn_and_ln_channels():
    m, bs = model(), batches()
    want = brute_jacobian(m, bs)
    res = oba_ext.score(m, bs, kind="jacobian", granularity=("out", "in"), impl="reference",
                        progress=False)
    assert set(NORMS) <= set(res), f"norm layers must be scored, got {sorted(res)}"
    for (name, key), v in want.items():
        got = res[name].out if key == "out" else res[name].inp
        assert_close_rel(got, v, f"jacobian {name}.{key}")
    assert all(p.grad is None for p in m.parameters()), "scoring must leave .grad untouched"


def test_jacobian_squares_each_batch_before_averaging():
    """mean_b t_b² ≠ (mean_b t_b)²: the per-batch values are kept through the average."""
    m, bs = model(), batches()
    jac = oba_ext.score(m, bs, kind="jacobian", granularity="out", impl="reference",
                        progress=False, keep_per_batch=True)
    tay = oba_ext.score(m, bs, kind="taylor", granularity="out", impl="reference",
                        progress=False, keep_per_batch=True)
    for name in DENSE:
        per_b = torch.stack(tay[name].per_batch["out"])
        assert_close_rel(torch.stack(jac[name].per_batch["out"]), per_b ** 2, f"{name} per batch")
        assert not torch.allclose(jac[name].out, tay[name].out ** 2, rtol=NOT_EQUAL_RTOL)


def test_jacobian_group_score_is_sum_of_component_scores():
    """A conv filter's group (c1 row j + bias, BN channel j, c2 input slice j) scores the sum of
    its components' squared per-batch terms, with no cross terms."""
    m, bs = model(), batches()
    res = oba_ext.score(m, bs, kind="jacobian", granularity=("out", "in"), impl="reference",
                        progress=False)
    group = res["c1"].out + res["bn"].out + res["c2"].inp
    want = 0
    for x, t in bs:
        c = components_of_batch(m, x, t)
        want = want + c[("c1", "out")] ** 2 + c[("bn", "out")] ** 2 + c[("c2", "in")] ** 2
    assert_close_rel(group, want / len(bs), "group score")
    cross = 0
    for x, t in bs:
        c = components_of_batch(m, x, t)
        cross = cross + (c[("c1", "out")] + c[("bn", "out")] + c[("c2", "in")]) ** 2
    assert not torch.allclose(group, cross / len(bs), rtol=NOT_EQUAL_RTOL), "cross terms must not appear"


@pytest.mark.parametrize("impl", ["auto", "kernel"])
def test_jacobian_engine_path_matches_definition(impl):
    """The engine's first-order channel reductions (``impl="kernel"``, and whatever ``"auto"``
    picks) give the same Jacobian scores, BN/LN channels included."""
    m, bs = model(), batches(2)
    want = brute_jacobian(m, bs)
    res = oba_ext.score(m, bs, kind="jacobian", granularity=("out", "in"), impl=impl,
                        progress=False)
    if impl == "kernel":
        assert res.impl == "kernel"
    for (name, key), v in want.items():
        got = res[name].out if key == "out" else res[name].inp
        assert_close_rel(got, v, f"jacobian[{res.impl}] {name}.{key}")
