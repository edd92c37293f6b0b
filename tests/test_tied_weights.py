"""Tied target parameters (an ``nn.Embedding`` whose weight is also the output Linear's, as in
GPT-2 and many LLMs): the engine refuses them, so ``auto`` falls back to the reference path,
which treats the shared tensor as one parameter θ (SPEC §1) and reports its score under every
layer that uses it. Before, the reference path passed the tensor under both names to
``torch.func.functional_call`` and crashed with torch's "multiple values for keys ... tied"."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import oba_ext
from tolerances import assert_close_rel


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.fc(self.emb(ids))).mean(1))


@pytest.mark.parametrize("kind", ["exact", "taylor"])
def test_tied_weight_is_one_parameter(kind):
    torch.manual_seed(0)
    m = Tied().double()
    ids, y = torch.randint(0, 7, (3, 5)), torch.tensor([1, 2, 6])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        res = oba_ext.score(m, [(ids, y)], kind=kind, granularity="weight", progress=False)
    assert res.impl == "reference"
    assert any("falling back to the reference path" in str(x.message) for x in w)
    assert torch.equal(res["emb"].weight, res["head"].weight)

    # brute force over {shared weight, fc.weight, fc.bias}: one tensor for both layers
    params = {"emb.weight": m.emb.weight.detach(), "fc.weight": m.fc.weight.detach(),
              "fc.bias": m.fc.bias.detach()}

    def f(p):
        return F.cross_entropy(functional_call(m, p, (ids,)), y)
    if kind == "exact":
        _, hv = torch.func.jvp(torch.func.grad(f), (params,), (params,))
    else:
        hv = torch.func.grad(f)(params)
    for name, field, key in [("emb", "weight", "emb.weight"), ("fc", "weight", "fc.weight"),
                             ("fc", "bias", "fc.bias")]:
        assert_close_rel(getattr(res[name], field), params[key] * hv[key],
                         what=f"{kind} {name}.{field}")


def test_kernel_refuses_tied_target_layers_by_name():
    """Two target layers sharing one tensor: the engine would score each use separately (their
    sum is the shared parameter's score), so it refuses, naming both."""
    torch.manual_seed(0)
    m = Tied().double()
    ids, y = torch.randint(0, 7, (3, 5)), torch.tensor([1, 2, 6])
    with pytest.raises(RuntimeError, match=r"'head\.weight', the same tensor as 'emb\.weight'"):
        oba_ext.score(m, [(ids, y)], kind="oba", impl="kernel", progress=False)
