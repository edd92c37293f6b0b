"""Engine attention rules (oba_ext/engine/rules/attention.py) against the reference path in
float64 (≤ 1e-10 relative, SPEC §7), for SDPA, nn.MultiheadAttention, a timm-style block and a
small torchvision VisionTransformer, in ``oba`` and ``exact`` modes; plus "head" granularity.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import oba_ext
from tolerances import FLOAT64_RTOL, assert_f64, rel_err

#: result fields holding only the k projection's bias scores (tolerances.ANALYTIC_ZERO)
K_BIAS_KEYS = ("parts.k.bias",)
#: names of separate k-projection Linear layers (their "bias" field is the k bias)
K_LAYERS = ("k", "k_proj")

E, H, T, NCLS = 16, 4, 6, 5


class TimmAttention(nn.Module):
    """timm.models.vision_transformer.Attention (fused_attn path), with an optional mask."""

    def __init__(self, dim=E, num_heads=H, qkv_bias=True, mask=None, is_causal=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)
        self.is_causal = is_causal
        if mask is not None:
            self.register_buffer("mask", mask)
        else:
            self.mask = None

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask,
                                           dropout_p=self.attn_drop.p if self.training else 0.0,
                                           is_causal=self.is_causal)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TimmBlock(nn.Module):
    def __init__(self, dim=E, **kw):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TimmAttention(dim, **kw)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenNet(nn.Module):
    """(B, T, E) tokens -> embed -> block -> mean pool -> classes."""

    def __init__(self, block):
        super().__init__()
        self.embed = nn.Linear(E, E)
        self.block = block
        self.head = nn.Linear(E, NCLS)

    def forward(self, x):
        return self.head(self.block(self.embed(x)).mean(1))


class MHABlock(nn.Module):
    def __init__(self, batch_first=True, kdim=None, need_weights=False, cross=False,
                 attn_mask=None, kpm=None, bias=True, causal=False):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim,
                                         bias=bias)
        self.kv = nn.Linear(E, kdim or E) if (cross or kdim) else None
        self.batch_first, self.need_weights, self.causal = batch_first, need_weights, causal
        self.attn_mask, self.kpm = attn_mask, kpm

    def forward(self, x):
        y = x if self.batch_first else x.transpose(0, 1)
        kv = self.kv(y) if self.kv is not None else y
        kw = {}
        if self.causal:
            kw["is_causal"] = True
        out, w = self.mha(y, kv, kv, need_weights=self.need_weights, attn_mask=self.attn_mask,
                          key_padding_mask=self.kpm, **kw)
        out = out if self.batch_first else out.transpose(0, 1)
        return x + out


def batches(n=2, B=3, seed=0, shape=(T, E)):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, *shape, generator=g, dtype=torch.float64),
             torch.randint(0, NCLS, (B,), generator=g)) for _ in range(n)]


def compare(model, data, kind, gran=("out", "in", "weight")):
    model = model.double().eval()
    kw = dict(kind=kind, granularity=gran, progress=False)
    a = oba_ext.score(model, data, impl="kernel", **kw)
    b = oba_ext.score(model, data, impl="reference", **kw)
    assert a.impl == "kernel"
    assert set(a) == set(b), (sorted(a), sorted(b))
    checked = 0
    for name in b:
        ta, tb = a[name].tensors(), b[name].tensors()
        assert set(ta) == set(tb), (name, sorted(ta), sorted(tb))
        scale = max((t.norm().item() for t in tb.values()), default=0.0)
        for key in tb:
            is_k_bias = key in K_BIAS_KEYS or (key == "bias" and name.rsplit(".", 1)[-1] in K_LAYERS)
            zero = "attn_k_bias" if is_k_bias else None
            assert_f64(ta[key], tb[key], f"{name}.{key}", zero, scale)
            checked += 1
    assert checked > 0
    return a, b


def causal_mask(n=T):
    return torch.ones(n, n, dtype=torch.bool).tril()


SDPA_CASES = {
    "nomask": dict(),
    "causal": dict(is_causal=True),
    "bool": dict(mask=(torch.rand(1, 1, T, T, generator=torch.Generator().manual_seed(3)) > 0.3)
                 | torch.eye(T, dtype=torch.bool)),
    "additive": dict(mask=torch.randn(T, T, generator=torch.Generator().manual_seed(4),
                                      dtype=torch.float64)),
}


@pytest.mark.parametrize("kind", ["oba", "exact"])
@pytest.mark.parametrize("case", list(SDPA_CASES))
def test_timm_block_sdpa(case, kind, kernels):
    kernels("cpu")
    torch.manual_seed(0)
    compare(TokenNet(TimmBlock(**SDPA_CASES[case])), batches(), kind)


MHA_CASES = {
    "packed_bf": dict(batch_first=True),
    "packed_sf": dict(batch_first=False),
    "separate_kdim": dict(kdim=8),
    "cross_weights": dict(cross=True, need_weights=True),
    "seqfirst_weights": dict(batch_first=False, need_weights=True),
    "nobias_boolmask": dict(bias=False, attn_mask=~causal_mask()),
    "float_mask_kpm": dict(attn_mask=torch.randn(T, T, generator=torch.Generator().manual_seed(5),
                                                 dtype=torch.float64),
                           kpm=torch.tensor([[False] * (T - 1) + [True]] * 3)),
    "causal_hint": dict(attn_mask=~causal_mask(), causal=True),
}


@pytest.mark.parametrize("kind", ["oba", "exact"])
@pytest.mark.parametrize("case", list(MHA_CASES))
def test_multihead_attention(case, kind, kernels):
    kernels("cpu")
    torch.manual_seed(1)
    compare(TokenNet(MHABlock(**MHA_CASES[case])), batches(), kind,
            gran=("out", "in", "weight"))


def tiny_vit():
    import torchvision
    torch.manual_seed(2)
    return torchvision.models.VisionTransformer(image_size=32, patch_size=4, num_layers=2,
                                                num_heads=4, hidden_dim=64, mlp_dim=128,
                                                num_classes=10)


@pytest.mark.parametrize("kind", ["oba", "exact"])
def test_torchvision_vit(kind, kernels):
    kernels("cpu")
    g = torch.Generator().manual_seed(7)
    data = [(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (2,), generator=g))]
    compare(tiny_vit(), data, kind, gran=("out", "in"))


def _head_by_hand(res, qkv_w, qkv_b, proj_w, H):
    """Σ over head h's parameters of the per-parameter scores: q/k/v rows (+ bias) of the
    packed projection and the head's input columns of the output projection."""
    E = proj_w.shape[1]
    rows = qkv_w.sum(1) + (qkv_b if qkv_b is not None else 0)
    head = rows.reshape(3, H, E // H).sum((0, 2))
    return head + proj_w.sum(0).reshape(H, E // H).sum(1)


@pytest.mark.parametrize("kind", ["oba", "exact"])
def test_head_scores_timm(kind, kernels):
    """Head scores under the attention module's name; equal to per-weight sums; parts."""
    kernels("cpu")
    torch.manual_seed(3)
    model = TokenNet(TimmBlock(is_causal=True)).double().eval()
    data = batches()
    a, b = compare(model, data, kind, gran=("head",))
    assert set(a["block.attn.qkv"].parts) == {"q.out", "k.out", "v.out"}
    assert a["block.attn.qkv"].out is None and a["block.attn.qkv"].inp is None
    assert a["block.mlp.0"].tensors() == {}
    w = oba_ext.score(model, data, kind=kind, granularity=("weight",), impl="reference",
                      progress=False)
    want = _head_by_hand(w, w["block.attn.qkv"].weight, w["block.attn.qkv"].bias,
                         w["block.attn.proj"].weight, H)
    assert a["block.attn"].head.shape == (H,)
    assert rel_err(a["block.attn"].head, want) <= FLOAT64_RTOL


@pytest.mark.parametrize("kind", ["oba", "exact"])
def test_head_scores_mha(kind, kernels):
    kernels("cpu")
    torch.manual_seed(4)
    model = TokenNet(MHABlock(batch_first=False)).double().eval()
    data = batches()
    a, _ = compare(model, data, kind, gran=("head", "out"))
    assert a["block.mha"].out.shape == (3 * E,)
    w = oba_ext.score(model, data, kind=kind, granularity=("weight",), impl="reference",
                      progress=False)
    want = _head_by_hand(w, w["block.mha"].weight, w["block.mha"].bias,
                         w["block.mha.out_proj"].weight, H)
    assert rel_err(a["block.mha"].head, want) <= FLOAT64_RTOL


def test_head_scores_vit(kernels):
    kernels("cpu")
    g = torch.Generator().manual_seed(8)
    data = [(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64),
             torch.randint(0, 10, (2,), generator=g))]
    a, _ = compare(tiny_vit(), data, "oba", gran=("head",))
    heads = {n for n, ls in a.items() if ls.head is not None}
    assert heads == {"encoder.layers.encoder_layer_0.self_attention",
                     "encoder.layers.encoder_layer_1.self_attention"}
    assert all(a[n].head.shape == (4,) for n in heads)


class HFAttention(nn.Module):
    """Hugging Face-style self-attention: separate q/k/v Linears, o_proj, SDPA on 4-D heads."""

    def __init__(self, dim=E, num_heads=H):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        B, N, C = x.shape

        def split(t):
            return t.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        o = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)),
                                           split(self.v_proj(x)), is_causal=True)
        return x + self.o_proj(o.transpose(1, 2).reshape(B, N, C))


def test_head_scores_hf_style(kernels):
    kernels("cpu")
    torch.manual_seed(6)
    model = TokenNet(HFAttention()).double().eval()
    data = batches()
    a, _ = compare(model, data, "exact", gran=("head", "in"))
    w = oba_ext.score(model, data, kind="exact", granularity=("weight",), impl="reference",
                      progress=False)
    rows = torch.cat([w[f"block.{p}_proj"].weight.sum(1) + w[f"block.{p}_proj"].bias
                      for p in "qkv"])
    want = rows.reshape(3, H, E // H).sum((0, 2)) + \
        w["block.o_proj"].weight.sum(0).reshape(H, E // H).sum(1)
    assert rel_err(a["block"].head, want) <= FLOAT64_RTOL
    assert a["block.q_proj"].inp is not None and a["block.q_proj"].out is None


class SDPA3D(nn.Module):
    """SDPA on (B, N, E) tensors (one head, leading dims as batch), additive 2-D mask."""

    def __init__(self, mask=None, dropout_p=0.0):
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(E, E) for _ in range(3))
        self.mask, self.dropout_p = mask, dropout_p

    def forward(self, x):
        return x + F.scaled_dot_product_attention(self.q(x), self.k(x), self.v(x),
                                                  attn_mask=self.mask, dropout_p=self.dropout_p)


@pytest.mark.parametrize("kind", ["oba", "exact"])
def test_sdpa_three_dim_inputs(kind, kernels):
    kernels("cpu")
    torch.manual_seed(7)
    mask = torch.randn(T, T, dtype=torch.float64)
    compare(TokenNet(SDPA3D(mask)), batches(), kind)


def test_refusals_name_the_problem(kernels):
    kernels("cpu")
    torch.manual_seed(8)
    with pytest.raises(ValueError, match="dropout_p=0.1"):
        oba_ext.score(TokenNet(SDPA3D(dropout_p=0.1)).double(), batches(1), impl="kernel",
                      progress=False)
    m = TokenNet(MHABlock()).double().eval()
    m.block.mha.bias_k = nn.Parameter(torch.zeros(1, 1, E, dtype=torch.float64))
    m.block.mha.bias_v = nn.Parameter(torch.zeros(1, 1, E, dtype=torch.float64))
    with pytest.raises(ValueError, match="add_bias_kv"):
        oba_ext.score(m, batches(1), impl="kernel", progress=False)


class WeightsToLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, H, batch_first=True)
        self.head = nn.Linear(E, NCLS)

    def forward(self, x):
        out, w = self.mha(x, x, x)
        return self.head(out.mean(1)) + w.mean((1, 2)).unsqueeze(1)


def test_attention_weights_feeding_the_loss_are_refused(kernels):
    kernels("cpu")
    # found while scoring: "kernel" raises naming it; "auto" falls back to the reference path
    # (tests/test_user_reports.py checks its numbers)
    with pytest.raises(RuntimeError, match="impl='kernel': .*attention weights returned by "
                                           "nn.MultiheadAttention feed the loss"):
        oba_ext.score(WeightsToLoss().double().eval(), batches(1), impl="kernel", kind="oba",
                      progress=False)
    with pytest.warns(UserWarning, match="falling back to the reference path from batch 0"):
        res = oba_ext.score(WeightsToLoss().double().eval(), batches(1), kind="oba",
                            progress=False)
    assert res.impl == "reference"


def test_float32_rule_vit(device, kernels):
    """SPEC §7 float32 rule (tests/tolerances.py, per tensor and pooled): the engine in
    float32 against the float32 reference path, both against the float64 reference, on the
    tiny ViT (CPU; CUDA kernels when a GPU is present)."""
    kernels(device)
    from oba_ext.reference import ReferenceScorer
    from oba_ext.engine import build_scorer
    from oba_ext.scoring import checked_loss, default_loss
    from oba_ext.targets import find_layers
    from tolerances import assert_matches_pooled
    g = torch.Generator().manual_seed(9)
    x64 = torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64).to(device)
    y = torch.randint(0, 10, (2,), generator=g).to(device)
    m64 = tiny_vit().double().eval().to(device)
    loss = checked_loss(default_loss)
    qs, keys = ("oba", "exact"), ("out", "in")
    ref64 = ReferenceScorer(m64, find_layers(m64), loss)(x64, y, qs, keys)
    m32 = tiny_vit().float().eval().to(device)
    x32 = x64.float()
    layers32 = find_layers(m32)
    eng32 = build_scorer(m32, layers32, loss, (x32, y))(x32, y, qs, keys)
    ref32 = ReferenceScorer(m32, layers32, loss)(x32, y, qs, keys)
    items = [(f"{name} {q} {k}", eng32[name][q][k], r, ref32[name][q][k])
             for name in layers32 for q in qs for k, r in ref64[name][q].items()]
    assert len(items) >= len(layers32) * len(qs) * len(keys)
    assert_matches_pooled(items, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["oba", "exact"])
def test_cuda_float64_parity(kind, kernels):
    kernels("cuda")
    g = torch.Generator().manual_seed(10)
    data = [(torch.randn(2, 3, 32, 32, generator=g, dtype=torch.float64).cuda(),
             torch.randint(0, 10, (2,), generator=g).cuda())]
    compare(tiny_vit().cuda(), data, kind, gran=("out", "in", "head"))
    torch.manual_seed(11)
    compare(TokenNet(TimmBlock(is_causal=True)).cuda(),
            [(x.cuda(), y.cuda()) for x, y in batches()], kind)


class GQAttention(nn.Module):
    """Grouped-query attention: 4 query heads share 2 key/value heads (SDPA enable_gqa)."""

    def __init__(self, dim=E, heads=H, kv_heads=2):
        super().__init__()
        self.h, self.kvh, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.hd)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q = self.q(x).view(B, N, self.h, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(B, N, 2, self.kvh, self.hd).permute(2, 0, 3, 1, 4).unbind(0)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return x + self.o(o.transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("kind", ["oba", "exact"])
def test_sdpa_grouped_query(kind, kernels):
    kernels("cpu")
    torch.manual_seed(12)
    compare(TokenNet(GQAttention()), batches(), kind)
