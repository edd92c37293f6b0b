"""torch.nn's transformer layers on the engine (nn.TransformerEncoderLayer, nn.TransformerEncoder,
nn.TransformerDecoderLayer): their fast-path checks cannot be traced by fx, so capture traces the
slow path, the function autograd (and so the reference path) runs. Every quantity and key in
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
