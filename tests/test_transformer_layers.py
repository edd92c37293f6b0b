"""torch.nn's transformer modules on the engine (nn.TransformerEncoderLayer/Encoder,
nn.TransformerDecoderLayer/Decoder, nn.Transformer): fx cannot trace the encoder's fast-path
checks, the decoder stack's causal-mask detection or nn.Transformer's size checks, so capture
traces an equivalent without them, the function autograd (and so the reference path) runs. Every quantity and key in
float64 per tensor against the reference (SPEC §7), with masks, both norm placements, both
batch layouts; and the three quantities in one engine call (two second-order passes), which
once double-recorded the attention's in-projection scores."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from oba_ext.targets import find_layers
from test_engine import compare

B, T, E = 3, 5, 8


class EncoderNet(nn.Module):
    def __init__(self, norm_first=False, activation="relu", batch_first=True, masks=False,
                 stack=0):
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=12, dropout=0.0,
                                           activation=activation, batch_first=batch_first,
                                           norm_first=norm_first)
        self.enc = (nn.TransformerEncoder(layer, stack, norm=nn.LayerNorm(E),
                                          enable_nested_tensor=False) if stack else layer)
        self.batch_first, self.masks = batch_first, masks
        self.head = nn.Linear(E, 3)
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[0, -2:] = True  # the last two tokens of sample 0 are padding
        self.register_buffer("pad", pad)
        # bool like the padding mask (True = may not attend): torch deprecates mixed mask types
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).triu(1))

    def forward(self, x):
        if not self.batch_first:
            x = x.transpose(0, 1)
        kw = {}
        if self.masks:
            name = "mask" if isinstance(self.enc, nn.TransformerEncoder) else "src_mask"
            kw = {name: self.causal, "src_key_padding_mask": self.pad}
        h = self.enc(x, **kw)
        if not self.batch_first:
            h = h.transpose(0, 1)
        return self.head(h.mean(1))


class DecoderNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.mem = nn.Linear(E, E)
        self.dec = nn.TransformerDecoderLayer(E, 2, dim_feedforward=12, dropout=0.0,
                                              batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        return self.head(self.dec(x, torch.tanh(self.mem(x))).mean(1))


def _xy(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, E, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g))


CASES = {
    "post-norm relu": dict(),
    "pre-norm gelu": dict(norm_first=True, activation="gelu"),
    "masks": dict(masks=True),
    "seq-first": dict(batch_first=False),
    "stack of 2 + norm": dict(stack=2),
    "stack with masks": dict(stack=2, masks=True, norm_first=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_encoder_layers_match_the_reference(case):
    torch.manual_seed(0)
    model = EncoderNet(**CASES[case]).double().eval()
    layers = find_layers(model)
    assert any(n.endswith("self_attn") for n in layers)
    assert any(n.endswith("linear1") for n in layers) and any(n.endswith("linear2") for n in layers)
    compare(model, *_xy())


def test_decoder_layer_matches_the_reference():
    torch.manual_seed(0)
    model = DecoderNet().double().eval()
    assert {"dec.self_attn", "dec.multihead_attn", "dec.linear1", "mem"} <= set(find_layers(model))
    compare(model, *_xy(1))


@pytest.mark.parametrize("which", ["layer", "encoder"])
def test_bare_encoder_as_the_root_model(which):
    """The layer itself as the model (capture's root): traced through the same equivalent."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    model = (layer if which == "layer" else
             nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)).double().eval()
    x, _ = _xy(2)
    y = torch.randn(B, T, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    compare(model, x, y, loss_fn=torch.nn.functional.mse_loss)
    assert type(model) in (nn.TransformerEncoderLayer, nn.TransformerEncoder)  # restored


class Seq2Seq(nn.Module):
    """nn.Transformer (encoder-decoder stacks) with a causal target mask and padding."""

    def __init__(self):
        super().__init__()
        self.t = nn.Transformer(E, 2, num_encoder_layers=1, num_decoder_layers=2,
                                dim_feedforward=12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(E, 3)
        self.register_buffer("causal", torch.ones(T, T, dtype=torch.bool).triu(1))
        pad = torch.zeros(B, T, dtype=torch.bool)
        pad[1, -1] = True
        self.register_buffer("pad", pad)

    def forward(self, x):
        h = self.t(x, torch.tanh(x), tgt_mask=self.causal, src_key_padding_mask=self.pad,
                   memory_key_padding_mask=self.pad)
        return self.head(h.mean(1))


def test_full_transformer_matches_the_reference():
    torch.manual_seed(0)
    model = Seq2Seq().double().eval()
    layers = find_layers(model)
    assert {"t.encoder.layers.0.self_attn", "t.decoder.layers.1.multihead_attn",
            "t.decoder.layers.1.linear2", "head"} <= set(layers)
    compare(model, *_xy(3))


def test_plain_mha_all_quantities_in_one_call():
    """taylor, oba and exact from one engine call (two second-order passes): the attention's
    in-projection scores are recorded once per pass (they were recorded again, doubled)."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(E, 2, batch_first=True)
            self.head = nn.Linear(E, 3)

        def forward(self, x):
            return self.head(self.mha(x, x, x, need_weights=False)[0].mean(1))
    torch.manual_seed(0)
    compare(Net().double().eval(), *_xy(4))
