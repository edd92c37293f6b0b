"""Hugging Face ``transformers.Conv1D`` (GPT-2's attention and MLP layers) as a layer kind
(``hf_conv1d``): one kind file, one engine rule, nothing else (issue 14's bar for new kinds).

Oracle: Conv1D computes ``X W + b`` with W (C_in, C_out); an ``nn.Linear`` holding ``Wᵀ``
is the same function of the same parameters, so every score must be the Linear's, with the
weight score transposed — on the engine, on the reference path, in float64 per tensor
(SPEC §7). GPT-2 itself (reference path: transformers 5 cannot be traced by fx) gets its
c_attn/c_proj/c_fc layers and head scores.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import oba_ext
from tolerances import FLOAT64_RTOL, assert_close_rel

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


class Block(nn.Module):
    """Linear-or-Conv1D MLP with a residual and a product of two activations (oba sees it)."""

    def __init__(self, conv1d: bool):
        super().__init__()
        mk = (lambda i, o: Conv1D(o, i)) if conv1d else nn.Linear
        self.fc1, self.fc2, self.gate, self.head = mk(6, 10), mk(10, 6), mk(6, 6), mk(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        h = x + self.fc2(h) * torch.sigmoid(self.gate(x))
        return self.head(h).mean(1)


def _pair():
    torch.manual_seed(0)
    lin = Block(conv1d=False).double()
    hf = Block(conv1d=True).double()
    with torch.no_grad():
        for name in ("fc1", "fc2", "gate", "head"):
            getattr(hf, name).weight.copy_(getattr(lin, name).weight.t())
            getattr(hf, name).bias.copy_(getattr(lin, name).bias)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 5, 6, generator=g, dtype=torch.float64),
                torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    return lin, hf, batches


def test_conv1d_is_a_target_layer_kind():
    lin, hf, _ = _pair()
    layers = oba_ext.find_layers(hf)
    assert sorted(layers) == ["fc1", "fc2", "gate", "head"]
    assert {s.kind for s in layers.values()} == {"hf_conv1d"}
    assert Conv1D in oba_ext.LAYER_KINDS and oba_ext.LAYER_KINDS.get(Conv1D) == "hf_conv1d"


@pytest.mark.parametrize("kind", ["oba", "exact", "taylor"])
@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_conv1d_scores_equal_the_transposed_linear(kind, impl):
    lin, hf, batches = _pair()
    gran = ("out", "in", "weight")
    want = oba_ext.score(lin, batches, kind=kind, granularity=gran, impl="reference",
                         progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback, no generic-rule warning
        got = oba_ext.score(hf, batches, kind=kind, granularity=gran, impl=impl, progress=False)
    assert got.impl == impl
    for name in ("fc1", "fc2", "gate", "head"):
        w, g = want[name], got[name]
        assert_close_rel(g.out, w.out, f"{impl} {kind} {name}.out")
        assert_close_rel(g.inp, w.inp, f"{impl} {kind} {name}.in")
        assert_close_rel(g.weight, w.weight.t(), f"{impl} {kind} {name}.weight")
        assert g.weight.is_contiguous()  # like the module's weight, not a transposed view
        if name == "head" and kind == "oba":
            # b ⊙ Σ C with C = 0 at the loss for oba (SPEC §3): zero by structure on both
            assert not g.bias.any() and not w.bias.any()
        else:
            assert_close_rel(g.bias, w.bias, f"{impl} {kind} {name}.bias")


@pytest.mark.parametrize("kind", ["exact", "oba", "ggn"])
def test_conv1d_curvature_products_on_the_engine(kind):
    lin, hf, batches = _pair()
    g = torch.Generator().manual_seed(2)
    v_lin = {n: torch.randn(p.shape, generator=g, dtype=p.dtype)
             for n, p in lin.named_parameters()}
    v_hf = {n: (t.t() if n.endswith("weight") else t) for n, t in v_lin.items()}
    want = oba_ext.hvp(lin, batches, v_lin, kind=kind, impl="reference")
    got = oba_ext.hvp(hf, batches, v_hf, kind=kind, impl="kernel")
    for n in v_lin:
        w = want[n].t() if n.endswith("weight") else want[n]
        if n == "head.bias" and kind == "oba":  # Ĥ has no loss curvature: zero by structure
            assert not got[n].any() and not w.any()
            continue
        assert_close_rel(got[n], w, f"hvp[{kind}] {n}", FLOAT64_RTOL)


def test_gpt2_scores_its_conv1d_layers_and_heads():
    cfg = transformers.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    model.config._attn_implementation = "eager"
    names = set(oba_ext.find_layers(model))
    for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        assert f"transformer.h.0.{part}" in names
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 13, (2, 5), generator=g)

    def loss(out, y):
        return nn.functional.cross_entropy(out.logits.flatten(0, 1), y.flatten())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference-path fallback warning
        res = oba_ext.score(model, [(ids, ids)], loss_fn=loss, granularity=("out", "in", "head"),
                            progress=False)
    attn = res["transformer.h.0.attn.c_attn"]
    assert attn.out.shape == (24,) and attn.inp.shape == (8,)
    heads = {n: ls.head for n, ls in res.items() if ls.head is not None}
    assert list(heads) == ["transformer.h.0.attn"] and heads["transformer.h.0.attn"].shape == (2,)
    # the head score is the sum of its q/k/v output channels and c_proj input channels
    h = heads["transformer.h.0.attn"]
    proj = res["transformer.h.0.attn.c_proj"].inp
    want = torch.stack([attn.out[i * 4:(i + 1) * 4].sum() + attn.out[8 + i * 4:8 + (i + 1) * 4].sum()
                        + attn.out[16 + i * 4:16 + (i + 1) * 4].sum() + proj[i * 4:(i + 1) * 4].sum()
                        for i in range(2)])
    assert_close_rel(h, want, "gpt2 head = q/k/v out + c_proj in")


def test_gpt2_heads_without_a_false_headless_warning():
    """GPT2LMHeadModel and GPT2Model carry n_head only through their config: they are
    containers of the attention blocks, not headless attention (a warning said so before)."""
    from oba_ext.heads import headless_attention
    cfg = transformers.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    assert headless_attention(model) == []
