"""SPEC §8 at the edges, on the engine (``impl="kernel"``) and the reference path alike.

1. ``nn.EmbeddingBag``/``F.embedding_bag`` with θ-dependent ``per_sample_weights`` and/or a
   θ-dependent table: the weighted bag sum is a product of two θ-dependent values and carries OBA
   curvature as if written out (``Σ_j p_j · W[i_j]``). Right values: brute force (torch.func
   Hessians of a hand-written twin of the model, float64): the model below has no nonlinearity
   but the bag's product, max, and the loss, so ``exact`` = θ⊙Hθ and ``oba`` = θ⊙(H − GGN)θ
   (SPEC §2: the loss's curvature is the only one Ĥ drops). Linearizing the product instead
   is off by 30-60% on gate/tab/emb here. Before, both paths raised torch's "forward AD not
   implemented for _embedding_bag" (or "derivative for _embedding_bag_per_sample_weights_backward
   is not implemented" for exact).
2. ``scale_grad_by_freq=True`` on an embedding bag (module or functional) is refused by name on
   every path, as it is on ``nn.Embedding``; before, ``taylor`` silently used torch's
   frequency-rescaled gradient for a θ-dependent table.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev

import brute
import oba_ext
from tolerances import FLOAT64_RTOL, assert_close_rel

DT = torch.float64
V, E, C, B, L = 7, 4, 3, 5, 3
PAD = 2
GRAN = ("weight", "out", "in")


def _quiet_score(model, batches, impl, kind, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-time "no rule"/fallback notes are not under test
        return oba_ext.score(model, batches, kind=kind, impl=impl, progress=False, **kw)


# ---------------------------------------------------------------------------------------------
# 1. embedding bags with θ-dependent per-sample weights / tables
# ---------------------------------------------------------------------------------------------

class BagModel(nn.Module):
    """``h = emb(i)``; per-sample weights ``p = gate(h)`` (θ-dependent, ``psw="theta"``), a fixed
    tensor (``"const"``) or none; the table ``W = tab(table)`` (θ-dependent) or, with
    ``module=True``, an ``nn.EmbeddingBag``'s own weight (not a target: a constant); bags of
    ``L`` entries with ``padding_idx``; ``fc(bag + mean_t h)``. ``hand=True``: the bag written
    out by hand (the brute-force twin, same parameters)."""

    def __init__(self, mode="sum", psw="theta", module=False, flat=True, hand=False):
        super().__init__()
        self.mode, self.psw, self.module, self.flat, self.hand = mode, psw, module, flat, hand
        self.emb = nn.Embedding(V, E)
        self.gate = nn.Linear(E, 1)
        self.table = nn.Parameter(torch.randn(V, E))
        self.tab = nn.Linear(E, E)
        self.bag = nn.EmbeddingBag(V, E, mode=mode, padding_idx=PAD)
        self.fc = nn.Linear(E, C)
        self.register_buffer("const", torch.linspace(0.5, 1.5, B * L).reshape(B, L))

    def forward(self, i):
        h = self.emb(i)
        p = {"theta": self.gate(h).squeeze(-1), "const": self.const, None: None}[self.psw]
        if self.hand:
            W = self.bag.weight if self.module else self.tab(self.table)
            rows = W[i] * (p.unsqueeze(-1) if p is not None else 1)
            keep = (i != PAD).unsqueeze(-1)
            if self.mode == "max":
                out = torch.where(keep, rows, float("-inf")).max(1).values
                out = torch.where(keep.any(1), out, 0.0)
            else:
                out = torch.where(keep, rows, 0.0).sum(1)
                if self.mode == "mean":
                    out = out / keep.sum(1).clamp(min=1)
        elif self.module:
            out = self.bag(i, per_sample_weights=p)
        elif self.flat:  # 1D input with offsets
            out = F.embedding_bag(i.flatten(), self.tab(self.table), torch.arange(0, B * L, L), mode=self.mode,
                                  per_sample_weights=None if p is None else p.flatten(),
                                  padding_idx=PAD)
        else:
            out = F.embedding_bag(i, self.tab(self.table), mode=self.mode, per_sample_weights=p,
                                  padding_idx=PAD)
        return self.fc(out + h.mean(1))


def _bag_pair(**kw):
    torch.manual_seed(0)
    m = BagModel(**kw).to(DT)
    twin = BagModel(**kw, hand=True).to(DT)
    twin.load_state_dict(m.state_dict())
    return m, twin


def _batch():
    g = torch.Generator().manual_seed(1)
    i = torch.randint(0, V, (B, L), generator=g)
    i[0, :] = PAD  # an empty bag
    i[1, 0] = PAD
    return i, torch.randint(0, C, (B,), generator=g)


def _brute(twin, x, y):
    """``{param: θ⊙Hθ}``, ``{param: θ⊙(H − GGN)θ}`` of the hand-written twin (no oba_ext)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "bag (EmbeddingBag) is held fixed": it is meant to be
        tp = brute.target_params(twin)
    others = {n: p.detach() for n, p in twin.named_parameters() if n not in tp}
    bufs = dict(twin.named_buffers())
    _, v0, unflat = brute.flat(tp)

    def f(v):
        return functional_call(twin, {**others, **bufs, **unflat(v)}, (x,))
    H = hessian(lambda v: F.cross_entropy(f(v), y))(v0)
    J = jacrev(f)(v0).reshape(-1, v0.numel())
    z0 = f(v0).detach()
    Hl = hessian(lambda z: F.cross_entropy(z, y))(z0).reshape(z0.numel(), z0.numel())
    exact = {n: tp[n] * h for n, h in unflat(H @ v0).items()}
    oba = {n: tp[n] * h for n, h in unflat((H - J.T @ Hl @ J) @ v0).items()}
    return {"exact": exact, "oba": oba}


def _check_weights(res, want, what):
    total = torch.cat([w.reshape(-1) for w in want.values()]).norm()
    for pname, w in want.items():
        layer, attr = pname.rsplit(".", 1)
        got = getattr(res[layer], attr)
        if w.norm() <= FLOAT64_RTOL * total:  # a score that is 0 by the maths (brute force: noise)
            assert got.norm() <= FLOAT64_RTOL * total, f"{what}: {pname} should be 0"
        else:
            assert_close_rel(got, w, f"{what}: {pname}")


BAG_CASES = {
    # name: (BagModel kwargs, what makes it interesting)
    "sum-theta-psw-theta-table-offsets": dict(mode="sum", psw="theta", flat=True),
    "sum-theta-psw-theta-table-2d": dict(mode="sum", psw="theta", flat=False),
    "sum-theta-psw-module": dict(mode="sum", psw="theta", module=True),
    "sum-const-psw-theta-table": dict(mode="sum", psw="const", flat=True),
    "mean-theta-table": dict(mode="mean", psw=None, flat=True),
    "max-theta-table": dict(mode="max", psw=None, flat=False),
}


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("case", list(BAG_CASES))
def test_embedding_bag_scores_match_brute_force(case, impl):
    m, twin = _bag_pair(**BAG_CASES[case])
    x, y = _batch()
    want = _brute(twin, x, y)
    for kind in ("oba", "exact"):
        res = _quiet_score(m, [(x, y)], impl, kind, granularity=GRAN)
        assert res.impl == impl
        _check_weights(res, want[kind], f"{case} {kind} impl={impl}")


def test_embedding_bag_written_out_equals_torch():
    """The written-out bag (both paths' definition) computes torch's values and gradients."""
    from oba_ext.reference.decompose import embedding_bag_math
    g = torch.Generator().manual_seed(2)
    W = torch.randn(V, E, dtype=DT, generator=g, requires_grad=True)
    cases = [(torch.randint(0, V, (4, 5), generator=g), None, False),
             (torch.randint(0, V, (9,), generator=g), torch.tensor([0, 0, 3, 3, 7]), False),
             (torch.randint(0, V, (9,), generator=g), torch.tensor([0, 0, 3, 3, 7, 9]), True)]
    for (i, off, last) in cases:
        for mode in ("sum", "mean", "max"):
            for pad in (None, PAD, -1):
                for with_p in ((False, True) if mode == "sum" else (False,)):
                    p = (torch.rand(i.shape, dtype=DT, generator=g).requires_grad_()
                         if with_p else None)
                    kw = dict(offsets=off, mode=mode, per_sample_weights=p,
                              include_last_offset=last, padding_idx=pad)
                    a, b = F.embedding_bag(i, W, **kw), embedding_bag_math(i, W, **kw)
                    what = f"{tuple(i.shape)} {mode} pad={pad} psw={with_p}"
                    assert_close_rel(b, a, what)
                    ct = torch.randn(a.shape, dtype=DT, generator=g)
                    wrt = [W] + ([p] if p is not None else [])
                    ga = torch.autograd.grad((a * ct).sum(), wrt)
                    gb = torch.autograd.grad((b * ct).sum(), wrt)
                    for x1, x2 in zip(gb, ga):
                        assert_close_rel(x1, x2, f"{what} grad")


def test_embedding_bag_tied_to_a_target_falls_back_and_matches():
    """An nn.EmbeddingBag sharing a target nn.Embedding's weight: the engine refuses the shared
    weight by name (``auto`` falls back); the reference path scores it like the written-out bag."""
    m, twin = _bag_pair(mode="sum", psw="theta", module=True)
    for net in (m, twin):
        net.bag.weight = net.emb.weight
        net.module = True
    twin.hand = True
    x, y = _batch()
    want = _brute(twin, x, y)
    with pytest.raises(RuntimeError, match="module 'bag' \\(EmbeddingBag\\) uses target"):
        _quiet_score(m, [(x, y)], "kernel", "oba", granularity=("weight",))
    for kind in ("oba", "exact"):
        res = _quiet_score(m, [(x, y)], "auto", kind, granularity=("weight",))
        assert res.impl == "reference"
        _check_weights(res, want[kind], f"tied {kind}")


# ---------------------------------------------------------------------------------------------
# 2. embedding bags with scale_grad_by_freq=True: refused by name on every path
# ---------------------------------------------------------------------------------------------

class FreqBag(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.functional = functional
        self.bag = nn.EmbeddingBag(V, E, mode="sum", scale_grad_by_freq=not functional)
        self.table = nn.Parameter(torch.randn(V, E))
        self.tab = nn.Linear(E, E)
        self.fc = nn.Linear(E, C)

    def forward(self, i):
        if self.functional:  # a θ-dependent table: torch's rescaled gradient reaches tab
            return self.fc(F.embedding_bag(i, self.tab(self.table), mode="sum",
                                           scale_grad_by_freq=True))
        return self.fc(self.bag(i))


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("call", ["score-reference", "score-auto", "score-kernel",
                                  "taylor-reference", "taylor-kernel", "hvp-reference",
                                  "hvp-kernel", "fisher-reference"])
def test_embedding_bag_scale_grad_by_freq_refused_by_name(functional, call):
    torch.manual_seed(0)
    m = FreqBag(functional).to(DT)
    x, y = _batch()
    before = {k: t.clone() for k, t in m.state_dict().items()}
    what, impl = call.split("-")
    msg = ("F.embedding_bag\\(..., scale_grad_by_freq=True\\)" if functional
           else "module 'bag' \\(EmbeddingBag, scale_grad_by_freq=True\\)")
    with warnings.catch_warnings(), pytest.raises((ValueError, RuntimeError), match=msg):
        warnings.simplefilter("ignore")
        if what == "hvp":
            v = {"fc.weight": torch.randn(C, E, dtype=DT)}
            oba_ext.hvp(m, [(x, y)], v, loss_fn=F.cross_entropy, impl=impl)
        else:
            kind = {"score": "exact", "taylor": "taylor", "fisher": "fisher"}[what]
            oba_ext.score(m, [(x, y)], F.cross_entropy, impl=impl, progress=False, kind=kind)
    for k, t in m.state_dict().items():
        assert torch.equal(t, before[k]), f"{call}: {k} was modified"


# ---------------------------------------------------------------------------------------------
# 3. empty batches: an error naming the batch and what is empty, on every path
# ---------------------------------------------------------------------------------------------

class Pool(nn.Module):
    """Tokens -> embedding -> mean over the sequence -> classes (a (B, 0) input: a NaN mean)."""

    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(V, E), nn.Linear(E, C)

    def forward(self, input_ids, extra=None):
        h = self.emb(input_ids).mean(1)
        if extra is not None:  # a zero-width feature block is legitimate
            h = torch.cat([h, extra], 1)
        return self.fc(h)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(V, E), nn.Linear(E, V)

    def forward(self, i):
        return self.fc(torch.tanh(self.emb(i)))


def _lm_loss(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def _next_token_loss(out, y):  # shifts inside the loss: length-1 sequences predict nothing
    return F.cross_entropy(out[:, :-1].flatten(0, 1), y[:, 1:].flatten())


def _tokens(b, t, seed=3):
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _run(call, model, batches, loss_fn, impl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if call == "hvp":
            v = {n: torch.ones_like(p) for n, p in model.named_parameters() if n.startswith("fc")}
            for kind in ("exact", "ggn", "oba"):
                oba_ext.hvp(model, batches, v, loss_fn=loss_fn, kind=kind, impl=impl,
                            progress=False)
        else:
            oba_ext.score(model, batches, loss_fn, kind=call, impl=impl, progress=False)


CALLS = ["oba", "exact", "taylor", "jacobian", "hessian_trace", "hvp"]


@pytest.mark.parametrize("impl", ["kernel", "reference", "auto"])
@pytest.mark.parametrize("call", CALLS)
def test_empty_sequence_input_is_refused_by_batch_and_input(call, impl):
    m = Pool().to(DT)
    good = (_tokens(3, 2), torch.tensor([0, 1, 2]))
    empty = (torch.zeros(3, 0, dtype=torch.long), torch.tensor([0, 1, 2]))
    with pytest.raises(oba_ext.EmptyBatchError, match=r"batches: batch 1 is empty \(inputs of "
                       r"shape \(3, 0\): dimension 1 has size 0\)"):
        _run(call, m, [good, empty], None, impl)
    kw = ({"input_ids": torch.zeros(3, 0, dtype=torch.long)}, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"batch 0 is empty \(inputs\['input_ids'\] of shape"):
        _run(call, m, [kw], None, impl)


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("call", CALLS)
def test_loss_over_zero_elements_is_refused_by_batch(call, impl):
    """Finite outputs, NaN loss: the loss averaged over nothing. Before, the scores of such a
    batch were silently 0 (zero gradient) and counted in the average."""
    m = TinyLM().to(DT)
    x = _tokens(3, 4)
    good = (x, x)
    for loss_fn, bad in ((_next_token_loss, (x[:, :1], x[:, :1])),               # length 1
                         (_lm_loss, (x, torch.full_like(x, -100)))):              # all ignored
        with pytest.raises(oba_ext.EmptyBatchError,
                           match=r"batches: batch 1 is empty: the loss is NaN although the "
                                 r"model's outputs \(\(3, \d, 7\)\) are finite: a mean over zero"):
            _run(call, m, [good, bad], loss_fn, impl)


def test_fisher_names_the_empty_samples():
    m = TinyLM().to(DT)
    x = _tokens(3, 4)
    y = x.clone()
    y[1] = -100  # sample 1 has no target: its per-sample gradient would count as 0
    with pytest.raises(oba_ext.EmptyBatchError,
                       match=r"batches: batch 0: sample\(s\) \[1\] are empty"):
        _run("fisher", m, [(x, y)], _lm_loss, "reference")


@pytest.mark.parametrize("impl", ["kernel", "reference"])
def test_empty_targets_tensor_is_refused(impl):
    m = Pool().to(DT)
    with pytest.raises(oba_ext.EmptyBatchError, match=r"batch 0 is empty \(targets of shape "
                                                      r"\(3, 0\): dimension 1 has size 0\)"):
        _run("oba", m, [(_tokens(3, 2), torch.zeros(3, 0, dtype=torch.long))], _lm_loss, impl)


def test_empty_side_input_is_not_an_empty_batch():
    """A zero-size tensor that is not the first input (a zero-width feature block) is legitimate:
    the loss is finite and the scores are those of the model without it."""
    m = Pool().to(DT)
    x, y = _tokens(4, 3), torch.tensor([0, 1, 2, 0])
    for impl in ("kernel", "reference"):
        with_extra = _quiet_score(m, [((x, torch.zeros(4, 0, dtype=DT)), y)], impl, "oba")
        plain = _quiet_score(m, [(x, y)], "reference", "oba")
        assert with_extra.impl == impl
        for name in plain:
            assert_close_rel(with_extra[name].out, plain[name].out, f"{impl} {name}")


# ---------------------------------------------------------------------------------------------
# 4. nn.MultiheadAttention's is_causal hint, read as torch reads it
# ---------------------------------------------------------------------------------------------

ME, MH, MT = 8, 2, 5


class CausalMHA(nn.Module):
    def __init__(self, mask, kpm=None, need_weights=False):
        super().__init__()
        self.inp, self.fc = nn.Linear(4, ME), nn.Linear(ME, C)
        self.mha = nn.MultiheadAttention(ME, MH, batch_first=True)
        with torch.no_grad():  # torch initializes them to 0: their scores would be 0 too
            self.mha.in_proj_bias.normal_(0, 0.3)
            self.mha.out_proj.bias.normal_(0, 0.3)
        self.mask, self.kpm, self.need_weights = mask, kpm, need_weights

    def forward(self, x):
        h = self.inp(x)
        o, _ = self.mha(h, h, h, attn_mask=self.mask, key_padding_mask=self.kpm,
                        need_weights=self.need_weights, is_causal=True)
        return self.fc(torch.tanh(o).mean(1))


def _mha_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, MT, 4, generator=g, dtype=DT), torch.tensor([0, 1, 2])


@pytest.mark.parametrize("impl", ["kernel", "reference", "auto"])
@pytest.mark.parametrize("call", ["oba", "taylor", "hvp"])
def test_mha_is_causal_without_mask_is_refused_like_torch(call, impl):
    torch.manual_seed(0)
    m = CausalMHA(None).to(DT).eval()
    x, y = _mha_batch()
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        m(x)  # torch's own forward
    who = ("module 'mha' \\(MultiheadAttention\\)" if impl != "reference"
           else "nn.MultiheadAttention \\(embed_dim=8, num_heads=2")
    with pytest.raises(ValueError, match=who + ".*is_causal=True without attn_mask"):
        _run(call, m, [(x, y)], None, impl)


def _wrong_hint():
    """A mask that is *not* causal, with the is_causal hint: torch's attention then applies the
    causal mask without key_padding_mask and need_weights, and the mask otherwise."""
    g = torch.Generator().manual_seed(6)
    return (torch.rand(MT, MT, generator=g) > 0.5) & ~torch.eye(MT, dtype=torch.bool)


@pytest.mark.parametrize("setting", ["hint-replaces-mask", "need_weights", "key_padding_mask"])
def test_mha_is_causal_hint_scores_torchs_function(setting):
    torch.manual_seed(0)
    kw = {"need_weights": dict(need_weights=True),
          "key_padding_mask": dict(kpm=torch.tensor([[False] * (MT - 1) + [True]] * 3)),
          }.get(setting, {})
    m = CausalMHA(_wrong_hint(), **kw).to(DT).eval()
    x, y = _mha_batch()
    want, _ = brute.hessian_and_ggn_scores(m, x, y, with_ggn=False)
    for impl in ("kernel", "reference"):
        res = _quiet_score(m, [(x, y)], impl, "exact", granularity=("weight",))
        assert res.impl == impl
        for pname, w in want.items():
            layer, attr = pname.rsplit(".", 1)
            if layer == "mha.out_proj":
                got = getattr(res["mha.out_proj"], attr)
            elif layer == "mha":
                got = getattr(res["mha"], "weight" if attr == "in_proj_weight" else "bias")
            else:
                got = getattr(res[layer], attr)
            assert_close_rel(got, w, f"{setting} {impl} {pname}")


# ---------------------------------------------------------------------------------------------
# 5. one cause, one exception class on every path
# ---------------------------------------------------------------------------------------------

class Tok(nn.Module):
    """Embedding -> ``body`` -> mean over tokens -> Linear, for the refusal table."""

    def __init__(self, body, emb=None, **mods):
        super().__init__()
        self.emb = emb or nn.Embedding(V, 8)
        self.l1, self.fc = nn.Linear(8, 8), nn.Linear(8, C)
        self.mods = nn.ModuleDict(mods)
        self.body = body

    def forward(self, i):
        return self.fc(self.body(self, self.l1(self.emb(i))).mean(1))


def _mha_body(s, h):
    return s.mods["a"](h, h, h, need_weights=False)[0]


BAG_I = torch.tensor([[0, 1], [1, 2], [2, 0], [3, 3], [4, 0]])

REFUSALS = {
    # cause: (model factory, kind, message on every path)
    "Embedding max_norm": (lambda: Tok(lambda s, h: h, emb=nn.Embedding(V, 8, max_norm=1.0)),
                           "oba", r"module 'emb' \(Embedding, max_norm=1.0\) renormalizes"),
    "EmbeddingBag scale_grad_by_freq": (
        lambda: Tok(lambda s, h: h + s.mods["b"](BAG_I).unsqueeze(1),
                    b=nn.EmbeddingBag(V, 8, scale_grad_by_freq=True)),
        "taylor", r"module 'mods.b' \(EmbeddingBag, scale_grad_by_freq=True\)"),
    "MultiheadAttention add_bias_kv": (
        lambda: Tok(_mha_body, a=nn.MultiheadAttention(8, 2, batch_first=True, add_bias_kv=True)),
        "oba", r"nn.MultiheadAttention with bias_k is not supported|add_bias_kv is not supported"),
    "MultiheadAttention is_causal without attn_mask": (
        lambda: Tok(lambda s, h: s.mods["a"](h, h, h, need_weights=False, is_causal=True)[0],
                    a=nn.MultiheadAttention(8, 2, batch_first=True)),
        "exact", r"is_causal=True without attn_mask"),
    "SDPA dropout": (lambda: Tok(lambda s, h: F.scaled_dot_product_attention(h, h, h,
                                                                             dropout_p=0.3)),
                     "oba", r"dropout"),
    "det in an oba run": (lambda: Tok(lambda s, h: h * torch.det(h[:, :2, :2])[:, None, None]),
                          "oba", r"det"),
    "alpha dropout in train mode": (lambda: Tok(lambda s, h: s.mods["d"](h),
                                                d=nn.AlphaDropout(0.3)),
                                    "taylor", r"alpha.dropout.* in train mode"),
}


@pytest.mark.parametrize("impl", ["kernel", "reference", "auto"])
@pytest.mark.parametrize("cause", list(REFUSALS))
def test_refusal_is_one_class_on_every_path(cause, impl):
    """Before: ValueError on one path, RuntimeError (a wrapped CaptureError) or
    NotImplementedError on another. Now RefusedError everywhere, which is all three."""
    make, kind, msg = REFUSALS[cause]
    torch.manual_seed(0)
    m = make().to(DT)
    m.train(cause == "alpha dropout in train mode")
    x, y = _tokens(5, 3), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(oba_ext.RefusedError, match=msg) as e:
        _quiet_score(m, [(x, y)], impl, kind)
    assert all(isinstance(e.value, t) for t in (ValueError, NotImplementedError, RuntimeError))


def test_engine_only_limits_stay_runtime_errors():
    """What the engine alone cannot run (the reference path can) is no refusal of the model:
    impl='kernel' raises a plain RuntimeError, impl='auto' falls back."""
    m = Tok(lambda s, h: s.mods["a"](h, h, h)[0] + s.mods["a"](h, h, h)[1].sum(-1, True),
            a=nn.MultiheadAttention(8, 2, batch_first=True)).to(DT).eval()
    x, y = _tokens(5, 3), torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(RuntimeError, match="attention weights") as e:
        _quiet_score(m, [(x, y)], "kernel", "oba")
    assert not isinstance(e.value, oba_ext.RefusedError)
    assert _quiet_score(m, [(x, y)], "auto", "oba").impl == "reference"
