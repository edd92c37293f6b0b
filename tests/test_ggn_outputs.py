"""The GGN product on models whose output is not one tensor (a tuple, a dict, a Hugging Face
``ModelOutput``, GPT-2 with its key/value cache): ``z`` is every floating tensor of the output,
other leaves are held fixed. Oracle: the same network returning the loss's input tensor alone,
where the GGN is the plain ``J_zᵀ H_loss J_z`` (checked against torch.func in test_hvp)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from tolerances import assert_close_rel


class Net(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        self.l, self.o, self.wrap = nn.Linear(3, 4), nn.Linear(4, 2), wrap

    def forward(self, x):
        h = self.o(torch.tanh(self.l(x)))
        return self.wrap(h)


def _modeloutput(h):
    from transformers.modeling_outputs import CausalLMOutput
    return CausalLMOutput(logits=h)


WRAPS = {
    "tuple": (lambda h: (h, h.square().sum()), lambda o, y: F.cross_entropy(o[0], y)),
    "dict": (lambda h: {"logits": h, "aux": torch.tanh(h)},
             lambda o, y: F.cross_entropy(o["logits"], y) + 0.1 * o["aux"].square().sum()),
    "ModelOutput": (_modeloutput, None),  # the default loss reads .logits
}


@pytest.mark.parametrize("wrap", list(WRAPS))
def test_ggn_over_structured_outputs(wrap):
    if wrap == "ModelOutput":
        pytest.importorskip("transformers")
    fwrap, loss = WRAPS[wrap]
    torch.manual_seed(0)
    model = Net(fwrap).double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(5, 3, generator=g, dtype=torch.float64),
             torch.randint(0, 2, (5,), generator=g))]
    v = {n: torch.randn(p.shape, generator=g, dtype=torch.float64)
         for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # auto: the engine refuses non-tensor outputs
        got = oba_ext.hvp(model, data, v, kind="ggn", loss_fn=loss)
    # oracle: z = the tensors the loss reads, as one flat tensor, in a plain network
    if wrap == "dict":  # z = (logits, aux): J_zᵀ H J_z with H block-diagonal in (h, tanh h)
        def loss2(zz, y):
            h, a = zz[:, :2], zz[:, 2:]
            return F.cross_entropy(h, y) + 0.1 * a.square().sum()
        plain = Net(lambda h: torch.cat([h, torch.tanh(h)], 1)).double()
    else:
        def loss2(zz, y):
            return F.cross_entropy(zz, y)
        plain = Net(lambda h: h).double()
    plain.load_state_dict(model.state_dict())
    want = oba_ext.hvp(plain, data, v, kind="ggn", loss_fn=loss2, impl="reference")
    for n in want:
        assert_close_rel(got[n], want[n], f"ggn {wrap} {n}")


def test_ggn_on_gpt2_with_its_cache():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 11, (2, 5), generator=g)

    def loss(o, y):
        return F.cross_entropy(o.logits.flatten(0, 1), y.flatten())
    v = {"transformer.h.0.mlp.c_fc.weight":
         torch.randn(model.transformer.h[0].mlp.c_fc.weight.shape, generator=g,
                     dtype=torch.float64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with_cache = oba_ext.hvp(model, [(ids, ids)], v, kind="ggn", loss_fn=loss)
        model.config.use_cache = False
        without = oba_ext.hvp(model, [(ids, ids)], v, kind="ggn", loss_fn=loss)
    for n in v:
        assert with_cache[n].abs().max() > 0
        assert_close_rel(with_cache[n], without[n], f"gpt2 ggn {n}")
