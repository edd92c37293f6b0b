"""Head scores of attention written with explicit matmuls (issue 10 item 8): BERT layout
(query/key/value + output.dense), LLaMA layout with grouped-query attention (q/k/v/o_proj,
fewer kv heads), GPT layout (packed c_attn/c_proj); modules with a head count but no known
layout are named in a warning."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from oba_ext.heads import find_head_groups, headless_attention
from tolerances import assert_close_rel

E, H = 8, 4


def _attn(q, k, v, heads, kv_heads):
    B, T, _ = q.shape
    q = q.view(B, T, heads, -1).transpose(1, 2)
    k = k.view(B, T, kv_heads, -1).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    v = v.view(B, T, kv_heads, -1).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
    return (a @ v).transpose(1, 2).reshape(B, T, -1)


class BertSelf(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_attention_heads = H
        self.query, self.key, self.value = nn.Linear(E, E), nn.Linear(E, E), nn.Linear(E, E)

    def forward(self, x):
        return _attn(self.query(x), self.key(x), self.value(x), H, H)


class BertOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(E, E)

    def forward(self, x):
        return self.dense(x)


class BertAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.self, self.output = BertSelf(), BertOut()

    def forward(self, x):
        return self.output(self.self(x))


class LlamaAttention(nn.Module):
    def __init__(self, kv_heads=2):
        super().__init__()
        self.head_dim = E // H  # no num_heads attribute, as in recent transformers
        self.kv = kv_heads
        self.q_proj = nn.Linear(E, E, bias=False)
        self.k_proj = nn.Linear(E, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(E, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(E, E, bias=False)

    def forward(self, x):
        return self.o_proj(_attn(self.q_proj(x), self.k_proj(x), self.v_proj(x), H, self.kv))


class GPTAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_head = H
        self.c_attn, self.c_proj = nn.Linear(E, 3 * E), nn.Linear(E, E)

    def forward(self, x):
        q, k, v = self.c_attn(x).split(E, -1)
        return self.c_proj(_attn(q, k, v, H, H))


class Headless(nn.Module):  # a head count, but q/k/v in one nn.Parameter: no layout
    def __init__(self):
        super().__init__()
        self.num_heads = H
        self.w = nn.Parameter(torch.randn(3, E, E) / 3)

    def forward(self, x):
        q, k, v = torch.einsum("bte,kfe->kbtf", x, self.w)
        return _attn(q, k, v, H, H)


class Net(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.emb = nn.Linear(5, E)
        self.attn = attn
        self.head = nn.Linear(E, 3)

    def forward(self, x):
        h = torch.tanh(self.emb(x))
        return self.head(torch.tanh(h + self.attn(h)).mean(1))


def _data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(3, 4, 5, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (3,), generator=g))]


def _score(attn):
    torch.manual_seed(0)
    m = Net(attn).double()
    return m, oba_ext.score(m, _data(), kind="exact", granularity=("out", "in", "head"),
                            impl="reference", progress=False)


def _heads(v, n):
    return v.reshape(n, -1).sum(1)


def test_bert_layout_heads_under_the_attention_module():
    m, res = _score(BertAttention())
    (g,) = find_head_groups(m)
    assert g.key == "attn" and g.out_in == "attn.output.dense"
    want = sum(_heads(res[f"attn.self.{p}"].out, H) for p in ("query", "key", "value")) \
        + _heads(res["attn.output.dense"].inp, H)
    assert_close_rel(res["attn"].head, want, "bert head")


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_llama_layout_grouped_query_heads(kv):
    m, res = _score(LlamaAttention(kv))
    g = H // kv
    kvs = _heads(res["attn.k_proj"].out, kv) + _heads(res["attn.v_proj"].out, kv)
    want = (_heads(res["attn.q_proj"].out, H) + _heads(res["attn.o_proj"].inp, H)
            + (kvs / g).repeat_interleave(g))
    assert res["attn"].head.shape == (H,)
    assert_close_rel(res["attn"].head, want, f"llama head kv={kv}")
    # every channel score of the block is counted exactly once
    total = sum(res[f"attn.{p}"].out.sum() for p in ("q_proj", "k_proj", "v_proj")) \
        + res["attn.o_proj"].inp.sum()
    assert_close_rel(res["attn"].head.sum().reshape(1), total.reshape(1), "head total")


def test_gpt_layout_packed_qkv():
    m, res = _score(GPTAttention())
    out = res["attn.c_attn"].out
    want = sum(_heads(out[i * E:(i + 1) * E], H) for i in range(3)) + _heads(res["attn.c_proj"].inp, H)
    assert_close_rel(res["attn"].head, want, "gpt head")
    assert set(res["attn.c_attn"].parts) == {"q.out", "k.out", "v.out"}


def test_attention_without_a_layout_is_named():
    torch.manual_seed(0)
    m = Net(Headless()).double()
    assert [n for n, _ in headless_attention(m)] == ["attn"]
    with pytest.warns(UserWarning, match="no head scores for 'attn'"):
        res = oba_ext.score(m, _data(), kind="taylor", granularity=("out", "head"),
                            impl="reference", progress=False)
    assert "attn" not in res
