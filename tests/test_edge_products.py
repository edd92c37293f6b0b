"""Issue 10, items 4, 5 and 10 (SPEC §8): products hidden inside one op, values that are not
floating point, and train-mode dropout — on impl="auto", "reference" and "kernel".

Right values (float64, SPEC §7 tolerance):
- brute force where the model is small: ``exact`` = θ⊙Hθ from the full Hessian, ``oba`` =
  θ⊙(H_lin − GGN)θ with a hand-written functional twin whose non-bilinear ops are linearized
  (tests/tiny_models.py's Linearizer) — independent of ``oba_ext.reference``;
- otherwise the reference oracle on the same model *written out* (``a * torch.sigmoid(b)`` for
  ``F.glu``, explicit gate products for nn.LSTM, ...), which is what SPEC §8 says the op means.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import hessian, jacrev

import brute
import oba_ext
import tiny_models as tm
from tolerances import FLOAT64_RTOL, SURVIVES, assert_close_rel

D = torch.float64
IMPLS = ("auto", "reference", "kernel")
GRAN = ("weight", "out", "in")


def _score(model, batches, kind, impl):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one-time "no rule" notes are not under test here
        return oba_ext.score(model, batches, kind=kind, granularity=GRAN, impl=impl,
                             progress=False)


def _per_weight(res):
    out = {}
    for name, ls in res.items():
        out[f"{name}.weight"] = ls.weight
        if ls.bias is not None:
            out[f"{name}.bias"] = ls.bias
    return out


def _assert_same(res, want, what):
    """Every per-weight, output- and input-channel score of ``res`` against ``want``."""
    for key in ("weight", "out", "inp"):
        _assert_dict({n: getattr(res[n], key) for n in want},
                     {n: getattr(ls, key) for n, ls in want.items()}, f"{what} [{key}]")


def _brute_oba(fn, model, x, y):
    """θ ⊙ (H_lin − GGN)θ over the target parameters, by full matrices (the twin ``fn(p, x, nl)``
    routes every non-bilinear op through ``nl``)."""
    tp = brute.target_params(model)
    allp = {n: p.detach() for n, p in model.named_parameters()}
    _, v0, unflat = brute.flat(tp)
    lin = tm.Linearizer()
    z0 = fn(allp, x, lin)
    lin.start_linearized()

    def f(v):
        lin.i = 0
        return fn({**allp, **unflat(v)}, x, lin)
    H = hessian(lambda v: F.cross_entropy(f(v), y))(v0)
    J = jacrev(f)(v0).reshape(-1, v0.numel())
    Hl = hessian(lambda z: F.cross_entropy(z, y))(z0.detach()).reshape(z0.numel(), z0.numel())
    return {n: tp[n] * h for n, h in unflat((H - J.T @ Hl @ J) @ v0).items()}


def _brute_exact(model, x, y):
    return brute.hessian_and_ggn_scores(model, x, y, with_ggn=False)[0]


def _assert_dict(got, want, what):
    """Per tensor to FLOAT64_RTOL; a tensor whose true value is zero (the last layer's bias has
    no oba curvature) must be zero to FLOAT64_RTOL of the whole model's scores (brute force
    leaves rounding noise there)."""
    total = torch.cat([w.reshape(-1) for w in want.values()]).norm()
    assert total > 0, f"{what}: all-zero reference"
    for n, w in want.items():
        if w.norm() <= FLOAT64_RTOL * total:
            assert got[n].norm() <= FLOAT64_RTOL * total, f"{what}: {n} should be 0"
        else:
            assert_close_rel(got[n], w, f"{what}: {n}")


def _check_brute(model, x, y, want, kind):
    for impl in IMPLS:
        res = _score(model, [(x, y)], kind, impl)
        assert res.impl == ("reference" if impl == "reference" else "kernel")
        _assert_dict(_per_weight(res), want, f"{type(model).__name__} {kind} impl={impl}")


# ============================================================================================
# Item 4: products hidden inside one op
# ============================================================================================
class GLUNet(nn.Module):
    """fc1 → GLU (three spellings) → fc2."""

    def __init__(self, form):
        super().__init__()
        self.fc1, self.fc2, self.form, self.glu = nn.Linear(5, 8), nn.Linear(4, 3), form, nn.GLU()

    def forward(self, x):
        z = self.fc1(x)
        if self.form == "explicit":
            a, b = z.chunk(2, -1)
            h = a * torch.sigmoid(b)
        else:
            h = self.glu(z) if self.form == "module" else F.glu(z, -1)
        return self.fc2(h)


def glu_twin(p, x, nl):
    a, b = F.linear(x, p["fc1.weight"], p["fc1.bias"]).chunk(2, -1)
    return F.linear(a * nl(torch.sigmoid, b), p["fc2.weight"], p["fc2.bias"])


@pytest.mark.parametrize("form", ["functional", "module"])
def test_glu_is_its_written_out_product_against_brute_force(form):
    torch.manual_seed(0)
    m = GLUNet(form).double()
    x, y = torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))
    _check_brute(m, x, y, _brute_oba(glu_twin, m, x, y), "oba")
    _check_brute(m, x, y, _brute_exact(m, x, y), "exact")
    # and the structured scores equal those of the explicit spelling, on every path
    ref = GLUNet("explicit").double()
    ref.load_state_dict(m.state_dict())
    want = _score(ref, [(x, y)], "oba", "reference")
    for impl in IMPLS:
        _assert_same(_score(m, [(x, y)], "oba", impl), want, f"GLU {form} impl={impl}")


class LSTMNet(nn.Module):
    """fc1 → tanh → nn.LSTM (or the same LSTM with explicit gate products) → last step → fc2."""

    def __init__(self, explicit=False, hidden=3):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(3, 3), nn.Linear(hidden, 3)
        self.rnn = nn.LSTM(3, hidden, batch_first=True)
        self.explicit, self.hidden = explicit, hidden

    def forward(self, x):
        u = torch.tanh(self.fc1(x))
        if not self.explicit:
            out, _ = self.rnn(u)
            return self.fc2(out[:, -1])
        r = self.rnn
        h = u.new_zeros(u.shape[0], self.hidden)
        c = u.new_zeros(u.shape[0], self.hidden)
        for t in range(u.shape[1]):
            g = (u[:, t] @ r.weight_ih_l0.T + r.bias_ih_l0 + h @ r.weight_hh_l0.T + r.bias_hh_l0)
            i, f, gg, o = g.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h = torch.sigmoid(o) * torch.tanh(c)
        return self.fc2(h)


def lstm_twin(p, x, nl):
    u = nl(torch.tanh, F.linear(x, p["fc1.weight"], p["fc1.bias"]))
    wi, wh, bi, bh = (p["rnn.weight_ih_l0"], p["rnn.weight_hh_l0"], p["rnn.bias_ih_l0"],
                      p["rnn.bias_hh_l0"])
    H = wh.shape[1]
    h = u.new_zeros(u.shape[0], H)
    c = u.new_zeros(u.shape[0], H)
    for t in range(u.shape[1]):
        i, f, g, o = (F.linear(u[:, t], wi, bi) + F.linear(h, wh, bh)).chunk(4, -1)
        c = nl(torch.sigmoid, f) * c + nl(torch.sigmoid, i) * nl(torch.tanh, g)
        h = nl(torch.sigmoid, o) * nl(torch.tanh, c)
    return F.linear(h, p["fc2.weight"], p["fc2.bias"])


def test_lstm_is_its_gate_products_against_brute_force():
    torch.manual_seed(1)
    m = LSTMNet().double()
    x, y = torch.randn(3, 3, 3, dtype=D), torch.randint(0, 3, (3,))
    _check_brute(m, x, y, _brute_oba(lstm_twin, m, x, y), "oba")
    _check_brute(m, x, y, _brute_exact(m, x, y), "exact")


class RecurrentNet(nn.Module):
    """Linear → a recurrent module (multi-layer, bidirectional, batch-first or not, or a cell
    unrolled over time) → Linear; ``explicit`` writes the module's math out by hand."""

    def __init__(self, kind, explicit=False):
        super().__init__()
        self.kind, self.explicit = kind, explicit
        self.fc1 = nn.Linear(3, 4)
        if kind == "lstm_proj":
            self.rnn = nn.LSTM(4, 4, num_layers=2, bidirectional=True, proj_size=2)
            out = 4
        elif kind == "gru":
            self.rnn = nn.GRU(4, 3, num_layers=2, batch_first=True, bidirectional=True)
            out = 6
        elif kind == "rnn":
            self.rnn = nn.RNN(4, 3, nonlinearity="relu", batch_first=True)
            with torch.no_grad():  # keep the ReLU units alive
                self.rnn.bias_ih_l0.uniform_(0.3, 0.6)
            out = 3
        else:
            cls = {"lstm_cell": nn.LSTMCell, "gru_cell": nn.GRUCell, "rnn_cell": nn.RNNCell}[kind]
            self.rnn = cls(4, 3)
            out = 3
        self.fc2 = nn.Linear(out, 3)

    def forward(self, x):                                   # x: (N, T, 3)
        u = torch.tanh(self.fc1(x))
        if self.kind.endswith("cell"):
            step = self._cell_explicit if self.explicit else self._cell
            state = None
            for t in range(3):  # a fixed sequence length (fx cannot loop over a traced size)
                state = step(u[:, t], state)
            h = state[0] if self.kind == "lstm_cell" else state
            return self.fc2(h)
        if self.explicit:
            out = self._seq_explicit(u)
        else:
            out = self.rnn(u.transpose(0, 1) if self.kind == "lstm_proj" else u)[0]
            if self.kind == "lstm_proj":
                out = out.transpose(0, 1)
        return self.fc2(out[:, -1])

    def _cell(self, x, state):
        out = self.rnn(x, state)
        return (out[0], out[1]) if self.kind == "lstm_cell" else out  # (h, c) unpacked

    # ---- written out by hand (independent of oba_ext.reference.decompose) -------------------
    def _w(self, suffix):
        r = self.rnn
        return [getattr(r, f"{n}{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def _cell_explicit(self, x, state):
        wi, wh, bi, bh = self._w("")
        n = x.shape[0]
        if self.kind == "lstm_cell":
            h, c = state if state is not None else (x.new_zeros(n, 3), x.new_zeros(n, 3))
            i, f, g, o = (x @ wi.T + bi + h @ wh.T + bh).chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        h = state if state is not None else x.new_zeros(n, 3)
        if self.kind == "gru_cell":
            ri, zi, ni = (x @ wi.T + bi).chunk(3, -1)
            rh, zh, nh = (h @ wh.T + bh).chunk(3, -1)
            r, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
            nn_ = torch.tanh(ni + r * nh)
            return (1 - z) * nn_ + z * h
        return torch.tanh(x @ wi.T + bi + h @ wh.T + bh)

    def _seq_explicit(self, u):                             # u: (N, T, F) -> (N, T, out)
        r = self.rnn
        x = u
        dirs = 2 if r.bidirectional else 1
        for layer in range(r.num_layers):
            outs = []
            for d in range(dirs):
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                wi, wh, bi, bh = self._w(sfx)
                n, T = x.shape[0], x.shape[1]
                hs = r.proj_size if getattr(r, "proj_size", 0) else r.hidden_size
                h, c = x.new_zeros(n, hs), x.new_zeros(n, r.hidden_size)
                ys = [None] * T
                for t in (reversed(range(T)) if d else range(T)):
                    xt = x[:, t]
                    if self.kind == "lstm_proj":
                        i, f, g, o = (xt @ wi.T + bi + h @ wh.T + bh).chunk(4, -1)
                        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                        h = (torch.sigmoid(o) * torch.tanh(c)) @ getattr(r, f"weight_hr{sfx}").T
                    elif self.kind == "gru":
                        ri, zi, ni = (xt @ wi.T + bi).chunk(3, -1)
                        rh, zh, nh = (h @ wh.T + bh).chunk(3, -1)
                        rr, z = torch.sigmoid(ri + rh), torch.sigmoid(zi + zh)
                        nn_ = torch.tanh(ni + rr * nh)
                        h = (1 - z) * nn_ + z * h
                    else:
                        h = torch.relu(xt @ wi.T + bi + h @ wh.T + bh)
                    ys[t] = h
                outs.append(torch.stack(ys, 1))
            x = torch.cat(outs, -1)
        return x


@pytest.mark.parametrize("kind", ["lstm_proj", "gru", "rnn", "lstm_cell", "gru_cell", "rnn_cell"])
def test_recurrent_modules_equal_their_written_out_math(kind):
    torch.manual_seed(2)
    m = RecurrentNet(kind).double()
    ref = RecurrentNet(kind, explicit=True).double()
    ref.load_state_dict(m.state_dict())
    x, y = torch.randn(2, 3, 3, dtype=D), torch.randint(0, 3, (2,))
    for q in ("oba", "exact"):
        want = _score(ref, [(x, y)], q, "reference")
        for impl in IMPLS:
            _assert_same(_score(m, [(x, y)], q, impl), want, f"{kind} {q} impl={impl}")


class OpNet(nn.Module):
    """Two θ-dependent activations ``a`` (N, 4) and ``b`` (N, 4) combined by one op; ``explicit``
    writes the op out with elementwise products and matmuls."""

    def __init__(self, op, explicit=False):
        super().__init__()
        self.op, self.explicit = op, explicit
        self.fa, self.fb, self.fc = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 4)
        self.bil = nn.Bilinear(4, 4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        a, b, c = torch.tanh(self.fa(x)), torch.sigmoid(self.fb(x)), self.fc(x)
        op, e = self.op, self.explicit
        if op == "addcmul":
            h = c + 0.5 * (a * b) if e else torch.addcmul(c, a, b, value=0.5)
        elif op == "addcmul_method":
            h = c + a * b if e else c.addcmul(a, b)
        elif op == "addcdiv":
            h = c + 2.0 * (a / (b + 1)) if e else torch.addcdiv(c, a, b + 1, value=2.0)
        elif op == "outer":
            h = (a[:, :, None] * b[:, None, :]).sum(0) if e else torch.outer(a[0], b[0]) + \
                torch.outer(a[1], b[1]) + torch.outer(a[2], b[2])
            h = (c @ h) if e else (c @ h)
        elif op == "einsum3":
            h = ((a[:, :, None] * b[:, None, :]) * c[:, :, None]).sum(1) if e else \
                torch.einsum("ni,nj,ni->nj", a, b, c)
        elif op == "tensordot":
            h = (a.T @ b) if e else torch.tensordot(a, b, dims=([0], [0]))
            h = c @ h
        elif op == "bmm":
            p = a[:, :, None] @ b[:, None, :] if e else torch.bmm(a[:, :, None], b[:, None, :])
            h = (p * c[:, None, :]).sum(-1)
        elif op == "bilinear":
            w, bias = self.bil.weight, self.bil.bias
            h = (a[:, None, :, None] * w[None] * b[:, None, None, :]).sum((-1, -2)) + bias if e \
                else self.bil(a, b)
        elif op == "F.bilinear":
            w = self.bil.weight
            h = (a[:, None, :, None] * w[None] * b[:, None, None, :]).sum((-1, -2)) if e \
                else F.bilinear(a, b, w)
        elif op == "addmm":
            h = 0.5 * c + 2.0 * (a @ (b.T @ c)) if e else \
                torch.addmm(c, a, b.T @ c, beta=0.5, alpha=2.0)
        elif op == "baddbmm":
            A, B = a.view(-1, 2, 2), b.view(-1, 2, 2)
            h = (c.view(-1, 2, 2) + A @ B) if e else torch.baddbmm(c.view(-1, 2, 2), A, B)
            h = h.reshape(-1, 4)
        elif op == "prod":
            h = a * b * c if e else torch.stack([a, b, c], 0).prod(0)
        elif op == "linear_theta_weight":  # F.linear with a θ-dependent weight and a bias
            w = a.T @ b
            h = c @ w.T + 1.0 if e else F.linear(c, w, torch.ones(4, dtype=a.dtype))
        else:
            raise ValueError(op)
        return self.head(h)


OPS = ["addcmul", "addcmul_method", "addcdiv", "outer", "einsum3", "tensordot", "bmm",
       "bilinear", "F.bilinear", "addmm", "baddbmm", "prod", "linear_theta_weight"]


@pytest.mark.parametrize("op", OPS)
def test_ops_with_products_equal_their_written_out_form(op):
    torch.manual_seed(3)
    m = OpNet(op).double()
    ref = OpNet(op, explicit=True).double()
    ref.load_state_dict(m.state_dict())
    x, y = torch.randn(3, 3, dtype=D), torch.randint(0, 3, (3,))
    for q in ("oba", "exact"):
        want = _score(ref, [(x, y)], q, "reference")
        for impl in IMPLS:
            _assert_same(_score(m, [(x, y)], q, impl), want, f"{op} {q} impl={impl}")


def test_hidden_products_are_not_linearized():
    """The point of item 4: oba of F.glu differs from the same network with the product
    linearized (sigmoid(b) held as a constant factor's tangent), by far more than rounding."""
    torch.manual_seed(0)
    m = GLUNet("functional").double()
    x, y = torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))

    def linearized_twin(p, x, nl):  # the product itself linearized too: no curvature
        a, b = F.linear(x, p["fc1.weight"], p["fc1.bias"]).chunk(2, -1)
        h = nl(lambda ab: ab[0] * torch.sigmoid(ab[1]), torch.stack([a, b]))
        return F.linear(h, p["fc2.weight"], p["fc2.bias"])
    wrong = _brute_oba(linearized_twin, m, x, y)["fc1.weight"]
    got = _per_weight(_score(m, [(x, y)], "oba", "kernel"))["fc1.weight"]
    assert (got - wrong).norm() > SURVIVES * wrong.norm()


class WithDet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(1, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)).view(-1, 2, 2).det().unsqueeze(-1))


def test_unknown_op_with_products_is_refused_by_name_for_oba():
    torch.manual_seed(4)
    m = WithDet().double()
    x, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    with pytest.raises(RuntimeError, match=r"cannot be captured: node 'det': tensor method "
                                           r"\.det\(\) has no engine rule"):
        _score(m, [(x, y)], "oba", "kernel")
    with pytest.raises(NotImplementedError, match=r"Tensor\.det of θ-dependent values"):
        _score(m, [(x, y)], "oba", "reference")
    with pytest.warns(UserWarning, match="falling back to the reference path"):
        with pytest.raises(NotImplementedError, match=r"Tensor\.det"):
            oba_ext.score(m, [(x, y)], kind="oba", impl="auto", progress=False)
    # exact and taylor keep the generic rule (exact there); its warning says oba refuses it
    from oba_ext.engine.rules import generic
    generic._WARNED.discard("tensor method .det()")
    with pytest.warns(UserWarning, match=r"no rule for tensor method \.det\(\).*an oba run "
                                         r"refuses it"):
        res = oba_ext.score(m, [(x, y)], kind="exact", granularity=GRAN, impl="kernel",
                            progress=False)
    _assert_dict(_per_weight(res), _brute_exact(m, x, y), "det exact kernel")


def test_generic_warning_no_longer_calls_every_result_correct():
    from oba_ext.engine.rules import generic

    class WithSin(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(3, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.fc2(torch.sin(self.fc1(x)))
    generic._WARNED.discard("function torch.sin")
    m = WithSin().double()
    x, y = torch.randn(3, 3, dtype=D), torch.randint(0, 3, (3,))
    with pytest.warns(UserWarning, match=r"no rule for function torch\.sin.*holds no product") as rec:
        oba_ext.score(m, [(x, y)], kind="oba", impl="kernel", progress=False)
    assert not any("correct, but slower" in str(w.message) for w in rec)


class TupleWhole(nn.Module):
    """A tuple-valued node passed whole to the next op (``torch.cat(h.chunk(2), -1)``)."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(torch.cat(h.chunk(2, -1), -1) * h)


def test_tuple_passed_whole_is_refused_by_the_engine_and_auto_falls_back():
    torch.manual_seed(8)
    m = TupleWhole().double()
    x, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    with pytest.raises(RuntimeError, match="node 'cat' takes the tuple 'chunk' whole"):
        _score(m, [(x, y)], "oba", "kernel")
    with pytest.warns(UserWarning, match="falling back to the reference path"):
        res = oba_ext.score(m, [(x, y)], kind="oba", granularity=GRAN, impl="auto",
                            progress=False)
    assert res.impl == "reference"
    _assert_dict(_per_weight(res), _brute_oba(_tuple_twin, m, x, y), "tuple whole, auto")


def _tuple_twin(p, x, nl):  # cat(h.chunk(2)) is h: the model is fc2(h * h)
    h = nl(torch.tanh, F.linear(x, p["fc1.weight"], p["fc1.bias"]))
    return F.linear(h * h, p["fc2.weight"], p["fc2.bias"])


# ============================================================================================
# Item 5: boolean and integer intermediates carry no streams
# ============================================================================================
class MaskNet(nn.Module):
    """``h * (h > 0).float()`` (= ReLU), an argmax-indexed gather and a boolean mask."""

    def __init__(self, relu=False):
        super().__init__()
        self.fc1, self.fc2, self.relu = nn.Linear(5, 6), nn.Linear(6, 3), relu

    def forward(self, x):
        h = self.fc1(x)
        h = torch.relu(h) if self.relu else h * (h > 0).float()
        idx = h.argmax(-1)
        top = h[torch.arange(h.shape[0]), idx].unsqueeze(-1)
        keep = (h.abs() > 0.1) & torch.isfinite(h)
        h = torch.where(keep, h, torch.zeros_like(h)) + 0.5 * top
        return self.fc2(h * keep.to(h.dtype) + h.long().to(h.dtype) * 0.0)


def test_bool_and_integer_values_carry_no_streams_against_brute_force():
    torch.manual_seed(5)
    m = MaskNet().double()
    x, y = torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))
    # no product of two θ-dependent values (masks are constants): Ĥ = H − GGN (SPEC §2)
    exact, oba = brute.hessian_and_ggn_scores(m, x, y)
    _check_brute(m, x, y, oba, "oba")
    _check_brute(m, x, y, exact, "exact")
    ref = MaskNet(relu=True).double()
    ref.load_state_dict(m.state_dict())
    want = _score(ref, [(x, y)], "taylor", "reference")
    for impl in IMPLS:
        _assert_same(_score(m, [(x, y)], "taylor", impl), want, f"mask taylor impl={impl}")


# ============================================================================================
# Item 10: train-mode dropout, one mask per batch on both streams
# ============================================================================================
class DropNet(nn.Module):
    """nn.Dropout, F.dropout, nn.Dropout2d and torchvision's stochastic depth, in train mode;
    ``masks`` replaces every random draw by a fixed tensor (the brute-force twin)."""

    def __init__(self, masks=None):
        super().__init__()
        from torchvision.ops import StochasticDepth
        self.fc1, self.fc2, self.fc3 = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.drop, self.drop2d, self.sd = nn.Dropout(0.4), nn.Dropout2d(0.3), StochasticDepth(0.5, "row")
        self.masks = masks

    def _m(self, i, fn, h):
        return h * self.masks[i] if self.masks is not None else fn(h)

    def forward(self, x):
        h = self._m(0, self.drop, torch.tanh(self.fc1(x)))
        g = self._m(1, lambda v: F.dropout(v, 0.2, training=self.training), torch.tanh(self.fc2(h)))
        h = g + self._m(2, self.sd, h)
        z = self._m(3, self.drop2d, self.conv(h.view(-1, 1, 2, 3))).flatten(1)
        return self.fc3(h * z)


def _draw_masks(seed, n):
    """The masks DropNet draws from ``seed``, in its call order (what one forward consumes)."""
    from torchvision.ops import stochastic_depth
    torch.manual_seed(seed)
    ones = torch.ones(n, 6, dtype=D)
    return [F.dropout(ones, 0.4, True), F.dropout(ones, 0.2, True),
            stochastic_depth(ones, 0.5, "row", True),
            F.dropout2d(torch.ones(n, 1, 2, 3, dtype=D), 0.3, True)]


def test_train_mode_dropout_one_mask_per_batch_on_every_path():
    torch.manual_seed(6)
    m = DropNet().double().train()
    fixed = DropNet(masks=_draw_masks(11, 6)).double().train()
    fixed.load_state_dict(m.state_dict())
    x, y = torch.randn(6, 5, dtype=D), torch.randint(0, 3, (6,))
    want = {"exact": _brute_exact(fixed, x, y)}
    want["oba"] = _per_weight(_score(fixed, [(x, y)], "oba", "reference"))
    for q in ("oba", "exact"):
        for impl in IMPLS:
            torch.manual_seed(11)
            res = _score(m, [(x, y)], q, impl)
            assert res.impl == ("reference" if impl == "reference" else "kernel")
            _assert_dict(_per_weight(res), want[q], f"dropout {q} impl={impl}")


def test_dropout_engine_equals_reference_over_batches_and_advances_rng_alike():
    torch.manual_seed(7)
    m = DropNet().double().train()
    batches = [(torch.randn(4, 5, dtype=D), torch.randint(0, 3, (4,))) for _ in range(2)]
    out = {}
    for impl in ("reference", "kernel"):
        torch.manual_seed(3)
        out[impl] = (_score(m, batches, "oba", impl), torch.get_rng_state())
    assert torch.equal(out["reference"][1], out["kernel"][1])  # one forward's draws per batch
    _assert_same(out["kernel"][0], out["reference"][0], "dropout over two batches")
    # each batch drew its own masks: scoring batch 2 alone from the same seed differs
    torch.manual_seed(3)
    one = _score(m, batches[1:], "oba", "kernel")
    assert not torch.allclose(one["fc1"].out, _score_second_after_first(m, batches)["fc1"].out)


def _score_second_after_first(m, batches):
    torch.manual_seed(3)
    _score(m, batches[:1], "oba", "kernel")
    return _score(m, batches[1:], "oba", "kernel")


def test_alpha_dropout_in_train_mode_is_refused_by_name():
    m = nn.Sequential(nn.Linear(4, 4), nn.AlphaDropout(0.3), nn.Linear(4, 3)).double().train()
    x, y = torch.randn(3, 4, dtype=D), torch.randint(0, 3, (3,))
    with pytest.raises(RuntimeError, match="alpha dropout in train mode"):
        _score(m, [(x, y)], "oba", "kernel")
    with pytest.raises(NotImplementedError, match="alpha_dropout / nn.AlphaDropout in train mode"):
        _score(m, [(x, y)], "oba", "reference")
    m.eval()
    for impl in IMPLS:
        assert _score(m, [(x, y)], "oba", impl)["0"].out.abs().max() > 0
