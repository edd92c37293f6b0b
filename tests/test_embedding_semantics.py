"""Embedding semantics on every path, against brute force (torch.func Hessians, float64).

- ``padding_idx``: the *lookup* of the padding row is a constant (torch's embedding backward
  gives that row no gradient from the lookup); the row is still a parameter, so tied to an LM
  head (``head.weight = emb.weight``, BERT-MLM) it moves through the head. Brute force: a model
  whose lookup reads ``where(row == pad, W.detach(), W)`` by hand, with no ``padding_idx``.
- ``scale_grad_by_freq`` (module or functional) and functional ``max_norm`` are refused by name
  on every path, without touching the weights.
- ``sparse=True`` scores like the dense embedding on the reference path.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev

import oba_ext
from tolerances import assert_close_rel

V, D, C = 5, 3, 4
IDX = torch.tensor([[0, 1, 2], [1, 3, 4], [4, 1, 1]])
Y = torch.tensor([1, 2, 0])


class PadModel(nn.Module):
    """Embedding(V, D, padding_idx=pad) -> tanh -> mean over tokens -> head (tied or not).
    ``hand=True``: no padding_idx; the lookup reads the pad row detached (the brute-force
    model, same parameters)."""

    def __init__(self, pad, tied, hand=False):
        super().__init__()
        self.pad, self.hand, self.tied = pad % V, hand, tied
        self.emb = nn.Embedding(V, D, padding_idx=None if hand else pad)
        self.head = nn.Linear(D, V if tied else C, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, i):
        if self.hand:
            W = self.emb.weight
            keep = (torch.arange(V) == self.pad).unsqueeze(-1)
            e = F.embedding(i, torch.where(keep, W.detach(), W))
        else:
            e = self.emb(i)
        return self.head(torch.tanh(e).mean(1))


def _models(pad, tied):
    torch.manual_seed(0)
    m = PadModel(pad, tied).double()
    with torch.no_grad():
        m.emb.weight[pad % V] = torch.randn(D, dtype=torch.float64)  # a loaded checkpoint's pad
    h = PadModel(pad, tied, hand=True).double()
    h.load_state_dict(m.state_dict())
    return m, h


def _names(model):
    return [n for n, _ in model.named_parameters()]  # tied: one name (emb.weight)


def _brute(h, v=None):
    """{name: θ⊙∇L, θ⊙Hθ, H v, G v} on the hand-made model (``v``: dict, default θ)."""
    names = _names(h)
    theta = {n: p.detach() for n, p in h.named_parameters()}
    shapes = [theta[n].shape for n in names]
    flat0 = torch.cat([theta[n].reshape(-1) for n in names])

    def unflat(f):
        return dict(zip(names, (t.reshape(s) for t, s in
                                zip(f.split([s.numel() for s in shapes]), shapes))))

    def out(f):
        return functional_call(h, unflat(f), (IDX,))

    def loss(f):
        return F.cross_entropy(out(f), Y)

    Hm, g = hessian(loss)(flat0), grad(loss)(flat0)
    J = jacrev(out)(flat0).reshape(-1, flat0.numel())
    Hl = hessian(lambda z: F.cross_entropy(z, Y))(out(flat0)).reshape(J.shape[0], J.shape[0])
    G = J.T @ Hl @ J
    vv = flat0 if v is None else torch.cat([v[n].reshape(-1) for n in names])
    return {"taylor": unflat(flat0 * g), "exact": unflat(flat0 * (Hm @ flat0)),
            "Hv": unflat(Hm @ vv), "Gv": unflat(G @ vv)}


def _score(m, kind, impl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # impl="auto" on a tied model warns it falls back
        r = oba_ext.score(m, [(IDX, Y)], F.cross_entropy, kind=kind, granularity="weight",
                          impl=impl, progress=False)
    return {"emb.weight": r["emb"].weight, **({} if m.tied else {"head.weight": r["head"].weight})}


def _hvp(m, v, kind, impl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return oba_ext.hvp(m, [(IDX, Y)], v, kind=kind, loss_fn=F.cross_entropy, impl=impl)


# tied models run on the reference path (the engine refuses tied weights; auto falls back)
CASES = [(1, True, "reference"), (1, True, "auto"), (1, False, "reference"), (1, False, "kernel"),
         (-1, False, "reference"), (-1, False, "kernel"), (-1, True, "reference")]


@pytest.mark.parametrize("pad,tied,impl", CASES)
@pytest.mark.parametrize("kind", ["taylor", "exact"])
def test_padding_scores_match_brute_force(pad, tied, impl, kind):
    m, h = _models(pad, tied)
    want = _brute(h)[kind]
    got = _score(m, kind, impl)
    for n in want:
        assert_close_rel(got[n], want[n], f"{kind} {impl} tied={tied} {n}")
    row = want["emb.weight"][pad % V]
    if tied:   # the pad row moves through the head: it has a score
        assert row.abs().max() > 0
    else:      # untied: nothing depends on the pad row; its scores are exactly 0
        assert row.abs().max() == 0 and got["emb.weight"][pad % V].abs().max() == 0


@pytest.mark.parametrize("pad,tied", [(1, True), (1, False), (-1, False)])
def test_padding_oba_reference_matches_hand_frozen_and_engine(pad, tied):
    """oba has no brute force; the Φ-oracle on the padding_idx model must equal the Φ-oracle on
    the model frozen by hand (a different mechanism), and untied the engine."""
    m, h = _models(pad, tied)
    ref, hand = _score(m, "oba", "reference"), _score(h, "oba", "reference")
    for n in ref:
        assert_close_rel(ref[n], hand[n], f"oba reference vs hand-frozen {n}")
    if tied:
        assert ref["emb.weight"][pad % V].abs().max() > 0
    else:
        ker = _score(m, "oba", "kernel")
        for n in ref:
            assert_close_rel(ker[n], ref[n], f"oba kernel vs reference {n}")
        assert ref["emb.weight"][pad % V].abs().max() == 0
        assert ker["emb.weight"][pad % V].abs().max() == 0


@pytest.mark.parametrize("pad,tied,impl", CASES)
@pytest.mark.parametrize("kind", ["exact", "ggn"])
def test_padding_hvp_matches_brute_force(pad, tied, impl, kind):
    m, h = _models(pad, tied)
    gen = torch.Generator().manual_seed(1)
    v = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64)
         for n, p in m.named_parameters()}
    assert v["emb.weight"][pad % V].abs().max() > 0   # the direction moves the pad row
    want = _brute(h, v)["Hv" if kind == "exact" else "Gv"]
    got = _hvp(m, v, kind, impl)
    for n in want:
        assert_close_rel(got[n], want[n], f"hvp {kind} {impl} tied={tied} {n}")


def test_padding_engine_keeps_refusing_tied_weights():
    m, _ = _models(1, True)
    with pytest.raises(RuntimeError, match="tied|shared"):
        _score(m, "exact", "kernel")


# ---------------------------------------------------------------------------------------------
# F.embedding(padding_idx) of a θ-dependent table on the engine (generic rule + pad mask)
# ---------------------------------------------------------------------------------------------

class TableModel(nn.Module):
    """The lookup table is a target Linear's output: ``W = lin(B)`` (V, D), ``F.embedding(i, W,
    padding_idx=1)``; ``hand=True``: the pad row of W detached by hand instead."""

    def __init__(self, hand=False):
        super().__init__()
        self.hand = hand
        self.register_buffer("base", torch.randn(V, 2))
        self.lin = nn.Linear(2, D)
        self.fc = nn.Linear(D, C)

    def forward(self, i):
        W = self.lin(self.base)
        if self.hand:
            keep = (torch.arange(V) == 1).unsqueeze(-1)
            e = F.embedding(i, torch.where(keep, W.detach(), W))
        else:
            e = F.embedding(i, W, padding_idx=1)
        return self.fc(torch.tanh(e).mean(1))


@pytest.mark.parametrize("impl", ["kernel", "reference"])
@pytest.mark.parametrize("kind", ["taylor", "exact"])
def test_functional_padding_of_computed_table(impl, kind):
    torch.manual_seed(0)
    m = TableModel().double()
    h = TableModel(hand=True).double()
    h.load_state_dict(m.state_dict())
    names = ["lin.weight", "lin.bias", "fc.weight", "fc.bias"]
    flat0 = torch.cat([dict(h.named_parameters())[n].detach().reshape(-1) for n in names])
    shapes = [dict(h.named_parameters())[n].shape for n in names]

    def loss(f):
        vals = dict(zip(names, (t.reshape(s) for t, s in
                                zip(f.split([s.numel() for s in shapes]), shapes))))
        return F.cross_entropy(functional_call(h, vals, (IDX,)), Y)

    q = flat0 * (grad(loss)(flat0) if kind == "taylor" else hessian(loss)(flat0) @ flat0)
    want = dict(zip(names, (t.reshape(s) for t, s in
                            zip(q.split([s.numel() for s in shapes]), shapes))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = oba_ext.score(m, [(IDX, Y)], F.cross_entropy, kind=kind, granularity="weight",
                          impl=impl, progress=False)
    assert r.impl == impl
    for n in names:
        layer, p = n.split(".")
        assert_close_rel(getattr(r[layer], p), want[n], f"{kind} {impl} {n}")


# ---------------------------------------------------------------------------------------------
# Refusals: scale_grad_by_freq (module, functional), functional max_norm
# ---------------------------------------------------------------------------------------------

class Flags(nn.Module):
    def __init__(self, functional=None, **kw):
        super().__init__()
        self.functional = functional
        self.emb = nn.Embedding(V, D, **({} if functional else kw))
        self.fc = nn.Linear(D, C)
        with torch.no_grad():
            self.emb.weight.mul_(5)

    def forward(self, i):
        if self.functional:   # a functional lookup into a plain parameter table
            e = F.embedding(i, self.table, **self.functional)
        else:
            e = self.emb(i)
        return self.fc(torch.tanh(e).mean(1))


def _flags_model(functional=None, **kw):
    torch.manual_seed(0)
    m = Flags(functional, **kw).double()
    if functional:
        m.table = nn.Parameter(torch.randn(V, D, dtype=torch.float64) * 5)
    return m


REFUSED = [({"scale_grad_by_freq": True}, None, "module 'emb' \\(Embedding, scale_grad_by_freq"),
           (None, {"scale_grad_by_freq": True}, "F.embedding\\(..., scale_grad_by_freq=True\\)"),
           (None, {"max_norm": 1.0}, "F.embedding\\(..., max_norm=1.0\\) renormalizes"),
           ({"max_norm": 1.0}, None, "module 'emb' \\(Embedding, max_norm=1.0\\) renormalizes")]


@pytest.mark.parametrize("kw,functional,msg", REFUSED)
@pytest.mark.parametrize("call", ["score-reference", "score-auto", "score-kernel",
                                  "hvp-reference", "hvp-auto", "fisher-reference"])
def test_embedding_flags_refused_by_name_without_side_effects(kw, functional, msg, call):
    m = _flags_model(functional, **(kw or {}))
    before = {k: t.clone() for k, t in m.state_dict().items()}
    what, impl = call.split("-")
    err = RuntimeError if impl == "kernel" else ValueError
    if impl == "kernel":  # the engine's capture refusal: names the node and the argument
        msg = "max_norm" if "max_norm" in (kw or functional) else "scale_grad_by_freq=True"
    with warnings.catch_warnings(), pytest.raises(err, match=msg):
        warnings.simplefilter("ignore")
        if what in ("score", "fisher"):
            kind = "exact" if what == "score" else "fisher"
            oba_ext.score(m, [(IDX, Y)], F.cross_entropy, kind=kind, impl=impl, progress=False)
        else:
            v = {"fc.weight": torch.randn(C, D, dtype=torch.float64)}
            oba_ext.hvp(m, [(IDX, Y)], v, loss_fn=F.cross_entropy, impl=impl)
    for k, t in m.state_dict().items():
        assert torch.equal(t, before[k]), f"{call}: {k} was modified"


# ---------------------------------------------------------------------------------------------
# sparse=True on the reference path
# ---------------------------------------------------------------------------------------------

class Sparse(nn.Module):
    def __init__(self, sparse, pad=None):
        super().__init__()
        self.emb = nn.Embedding(V, D, sparse=sparse, padding_idx=pad)
        self.o = nn.Linear(D, C)

    def forward(self, i):
        return self.o(torch.tanh(self.emb(i)).sum(1))


@pytest.mark.parametrize("pad", [None, 1])
def test_sparse_embedding_reference_matches_dense_brute_force(pad):
    torch.manual_seed(0)
    m = Sparse(True, pad).double()
    dense = Sparse(False, None).double()
    dense.load_state_dict(m.state_dict())
    names = _names(dense)
    flat0 = torch.cat([p.detach().reshape(-1) for p in dense.parameters()])
    shapes = [p.shape for p in dense.parameters()]

    def unflat(f):
        return dict(zip(names, (t.reshape(s) for t, s in
                                zip(f.split([s.numel() for s in shapes]), shapes))))

    def loss(f):
        p = unflat(f)
        if pad is not None:   # the pad row's lookup is constant
            W = p["emb.weight"]
            keep = (torch.arange(V) == pad).unsqueeze(-1)
            p["emb.weight"] = torch.where(keep, W.detach(), W)
        return F.cross_entropy(functional_call(dense, p, (IDX,)), Y)

    Hm = hessian(loss)(flat0)
    want = {"taylor": unflat(flat0 * grad(loss)(flat0)), "exact": unflat(flat0 * (Hm @ flat0))}
    for kind in ("taylor", "exact"):
        r = oba_ext.score(m, [(IDX, Y)], F.cross_entropy, kind=kind, granularity="weight",
                          impl="reference", progress=False)
        for n in names:
            layer, p = n.split(".")
            assert_close_rel(getattr(r[layer], p), want[kind][n], f"sparse {kind} {n}")
    ref = oba_ext.score(m, [(IDX, Y)], F.cross_entropy, kind="oba", granularity="weight",
                        impl="reference", progress=False)
    ker = oba_ext.score(m, [(IDX, Y)], F.cross_entropy, kind="oba", granularity="weight",
                        impl="kernel", progress=False)
    for n in ("emb.weight", "o.weight"):  # (o.bias: no product behind it, oba is 0)
        layer, p = n.split(".")
        assert_close_rel(getattr(ref[layer], p), getattr(ker[layer], p), f"sparse oba {n}")
    gen = torch.Generator().manual_seed(2)
    v = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in zip(names, shapes)}
    hv = oba_ext.hvp(m, [(IDX, Y)], v, loss_fn=F.cross_entropy, impl="reference")
    Hv = unflat(Hm @ torch.cat([v[n].reshape(-1) for n in names]))
    for n in names:
        assert_close_rel(hv[n], Hv[n], f"sparse hvp {n}")


@pytest.mark.parametrize("tied,sparse", [(True, False), (False, True)])
def test_fisher_embedding_matches_per_sample_brute_force(tied, sparse):
    """The fisher baseline (per-sample gradients by vmap(grad)) runs lookups like the oracles:
    pad row constant in the lookup (tied: it moves through the head), sparse as dense."""
    m, h = _models(1, tied)
    m.emb.sparse = sparse
    names = _names(h)
    theta = {n: p.detach() for n, p in h.named_parameters()}
    sq = {n: torch.zeros_like(t) for n, t in theta.items()}
    for k in range(IDX.shape[0]):
        g = grad(lambda p: F.cross_entropy(functional_call(h, p, (IDX[k:k + 1],)), Y[k:k + 1]))(theta)
        for n in names:
            sq[n] += g[n].square()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied: head.weight is scored under emb
        r = oba_ext.score(m, [(IDX, Y)], F.cross_entropy, kind="fisher", granularity="weight",
                          impl="reference", progress=False)
    want = theta["emb.weight"].square() * sq["emb.weight"] / IDX.shape[0]
    assert_close_rel(r["emb"].weight, want, f"fisher tied={tied} sparse={sparse} emb.weight")
    assert (want[1].abs().max() > 0) == tied


def test_bert_mlm_tied_padding_exact_matches_brute_force():
    """Hugging Face BERT-MLM: word_embeddings (padding_idx=pad_token_id) tied to the MLM
    decoder. exact θ⊙Hθ of the word embeddings (reference path via auto) vs the Hessian of the
    same model whose lookup reads the pad row detached by hand."""
    import copy
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.BertConfig(vocab_size=12, hidden_size=4, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=6, max_position_embeddings=8, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0, pad_token_id=0)
    model = T.BertForMaskedLM(cfg)
    model.config._attn_implementation = "eager"
    model = model.double().eval()
    emb = model.bert.embeddings.word_embeddings
    assert emb.padding_idx == 0 and model.cls.predictions.decoder.weight is emb.weight
    with torch.no_grad():
        emb.weight.copy_(torch.randn(emb.weight.shape, dtype=torch.float64) / 2)
    ids = torch.tensor([[2, 5, 0, 0], [7, 0, 3, 11]])
    x = {"input_ids": ids, "attention_mask": (ids != 0).long()}
    y = torch.tensor([[1, 4, 0, 9], [6, 2, 8, 10]])

    def loss_fn(out, t):
        return F.cross_entropy(out.logits.flatten(0, 1), t.flatten())

    hand = copy.deepcopy(model)
    hemb = hand.bert.embeddings.word_embeddings
    keep = (torch.arange(12) == 0).unsqueeze(-1)
    hemb.forward = lambda i: F.embedding(i, torch.where(keep, hemb.weight.detach(), hemb.weight))
    name = "bert.embeddings.word_embeddings.weight"
    th = emb.weight.detach().clone()
    Hm = hessian(lambda w: loss_fn(functional_call(hand, {name: w}, (), x), y))(th)
    want = th * (Hm.reshape(th.numel(), th.numel()) @ th.reshape(-1)).reshape(th.shape)
    assert want[0].abs().max() > 0   # the pad row moves through the decoder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = oba_ext.score(model, [(x, y)], loss_fn, kind="exact", granularity="weight",
                          targets=["bert.embeddings.word_embeddings"], progress=False)
    assert_close_rel(r["bert.embeddings.word_embeddings"].weight, want, "BERT-MLM exact")


class Bag(nn.Module):
    def __init__(self, functional):
        super().__init__()
        self.functional = functional
        self.bag = nn.EmbeddingBag(V, D, mode="mean", max_norm=None if functional else 1.0)
        self.fc = nn.Linear(D, C)
        with torch.no_grad():
            self.bag.weight.mul_(5)

    def forward(self, i):
        if self.functional:
            return self.fc(F.embedding_bag(i, self.bag.weight, max_norm=1.0))
        return self.fc(self.bag(i))


@pytest.mark.parametrize("functional", [False, True])
@pytest.mark.parametrize("call", ["score-reference", "score-auto", "score-kernel",
                                  "hvp-reference", "fisher-reference"])
def test_embedding_bag_max_norm_refused_by_name_without_side_effects(functional, call):
    torch.manual_seed(0)
    m = Bag(functional).double()
    before = {k: t.clone() for k, t in m.state_dict().items()}
    what, impl = call.split("-")
    msg = ("F.embedding_bag\\(..., max_norm=1.0\\)" if functional
           else "module 'bag' \\(EmbeddingBag, max_norm=1.0\\)") + " renormalizes"
    with warnings.catch_warnings(), pytest.raises(RuntimeError if impl == "kernel" else ValueError,
                                                  match=msg):
        warnings.simplefilter("ignore")
        if what == "hvp":
            v = {"fc.weight": torch.randn(C, D, dtype=torch.float64)}
            oba_ext.hvp(m, [(IDX, Y)], v, loss_fn=F.cross_entropy, impl=impl)
        else:
            oba_ext.score(m, [(IDX, Y)], F.cross_entropy, impl=impl, progress=False,
                          kind="exact" if what == "score" else "fisher")
    for k, t in m.state_dict().items():
        assert torch.equal(t, before[k]), f"{call}: {k} was modified"
