"""First-order passes through attention (``taylor``, ``jacobian``) run PyTorch's own
``F.scaled_dot_product_attention`` and its backward, not the two-stream kernels; their scores
match the reference path in float64 (≤ 1e-10, SPEC §7) for SDPA (masks, causal, grouped-query)
and nn.MultiheadAttention (batch_first either way, key padding + causal)."""
import pytest
import torch

from oba_ext.engine import kernels as engine_kernels
from test_attention_engine import (T, GQAttention, MHABlock, SDPA_CASES, TimmBlock,
                                   TokenNet, batches, causal_mask, compare)


@pytest.fixture
def no_two_stream_kernels(monkeypatch):
    """Fail if a first-order pass reaches the two-stream attention ops."""
    def refuse(*a, **k):
        raise AssertionError("a first-order pass called the two-stream attention kernels")
    monkeypatch.setattr(engine_kernels, "attention_two_stream_forward", refuse)
    monkeypatch.setattr(engine_kernels, "attention_second_order_backward", refuse)


@pytest.mark.parametrize("kind", ["taylor", "jacobian"])
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_sdpa_first_order(case, kind, kernels, no_two_stream_kernels):
    kernels("cpu")
    torch.manual_seed(1)
    compare(TokenNet(TimmBlock(**SDPA_CASES[case])), batches(), kind, gran=("out", "in"))


@pytest.mark.parametrize("kind", ["taylor", "jacobian"])
def test_grouped_query_first_order(kind, kernels, no_two_stream_kernels):
    kernels("cpu")
    torch.manual_seed(12)
    compare(TokenNet(GQAttention()), batches(), kind, gran=("out", "in"))


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_first_order(batch_first, kernels, no_two_stream_kernels):
    kernels("cpu")
    torch.manual_seed(2)
    kpm = torch.zeros(3, T, dtype=torch.bool)
    kpm[0, -2:] = True
    # is_causal is a hint that attn_mask is causal: torch refuses it without the mask
    compare(TokenNet(MHABlock(batch_first=batch_first, kpm=kpm, attn_mask=~causal_mask(),
                              causal=True)), batches(), "taylor")


def test_second_order_still_uses_the_kernels(kernels, monkeypatch):
    """``oba`` needs the tangents: it must run the two-stream ops (and match the reference)."""
    kernels("cpu")
    calls = []
    real = engine_kernels.attention_two_stream_forward

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)
    monkeypatch.setattr(engine_kernels, "attention_two_stream_forward", counting)
    torch.manual_seed(3)
    compare(TokenNet(TimmBlock(is_causal=True)), batches(), "oba")
    assert calls
